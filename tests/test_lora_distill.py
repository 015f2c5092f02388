"""Distilled fast mode by configuration: a step-distilled Wan2.1-family LoRA in LightX2V's format
(the original Wan names: `diffusion_model.blocks.N.self_attn.q.lora_down.weight`, `lora_up`, `alpha`)
served as an adapter through the LoRA path (serve.pipeline.lora), with its own defaults (4 steps,
guidance 1, flow shift 5) as the documented preset entry sets them.

- the tiny LightX2V-format LoRA, loaded by `AdapterCache` (diffusers converts the names), gives the
  latents of the same transformer with the LoRA merged into its weights by hand: W + alpha/rank · up @ down;
- a request naming the adapter without steps/guidance resolves to 4 steps / guidance 1 and runs so:
  4 denoising steps, one transformer forward per step (no unconditional branch); explicit values
  still win, within the model's limits;
- the commented entry in configs/skyreels-v2-t2v-14b-540p.yaml is a valid adapter config."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from serve.config import LoraAdapterConfig, ModelConfig
from serve.contracts import GenerationSpec
from serve.errors import InvalidSpecError
from serve.pipeline.denoising import DenoiseJob, DenoiseLoop, LoopSettings, clone_scheduler_config
from serve.pipeline.lora import AdapterCache, resolve_adapters
from serve.pipeline.spec import resolve_spec
from serve.pipeline.text_encoding import encode_prompts
from tests.tiny_fixtures import one_thread, pipe  # noqa: F401 - the module's fixtures
from serve.pipeline.tiny_model import WAN_ORIGINAL_NAMES, make_tiny_distill_lora

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
RANK, ALPHA = 4, 8.0
NAME = "lightx2v-4step"


@pytest.fixture(scope="module")
def distill_file(pipe, tmp_path_factory):
    return make_tiny_distill_lora(tmp_path_factory.mktemp("loras") / "wan2.1_t2v_tiny_lora_rank4_lightx2v_4step.safetensors",
                                  pipe.transformer, rank=RANK, alpha=ALPHA, seed=5)


@pytest.fixture(scope="module")
def model(distill_file):
    return ModelConfig(num_inference_steps=6, max_steps=8, lora={"adapters": [
        {"name": NAME, "path": str(distill_file), "num_inference_steps": 4, "guidance_scale": 1.0, "flow_shift": 5.0}]})


@pytest.fixture(scope="module")
def embeds(pipe):
    return (encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a red fox in the snow"], 512, CPU),
            encode_prompts(pipe.tokenizer, pipe.text_encoder, ["low quality"], 512, CPU))


def run(pipe, transformer, embeds, steps: int, guidance: float, shift: float = 5.0):
    calls = []
    handle = transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(1), with_kwargs=True)
    try:
        loop = DenoiseLoop(transformer, clone_scheduler_config(pipe.scheduler), CPU)
        job = DenoiseJob(seed=11, prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1] if guidance > 1 else None)
        loop.run([job], LoopSettings(width=64, height=64, num_frames=9, num_inference_steps=steps,
                                     guidance_scale=guidance, flow_shift=shift))
    finally:
        handle.remove()
    return job.result, len(calls)


def merged_by_hand(transformer, file: Path):
    """A copy of `transformer` with the LightX2V-format LoRA added into its weights."""
    from safetensors.torch import load_file

    sd = load_file(str(file))
    merged = copy.deepcopy(transformer)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for i in range(len(merged.blocks)):
            for ours, theirs in WAN_ORIGINAL_NAMES.items():
                key = f"diffusion_model.blocks.{i}.{theirs}"
                down, up = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"]
                scale = float(sd[f"{key}.alpha"]) / down.shape[0]
                modules[f"blocks.{i}.{ours}"].weight += scale * up @ down
    return merged


@pytest.mark.fast
def test_lightx2v_format_lora_loads_and_equals_the_merged_weights(pipe, embeds, model, distill_file):
    from safetensors import safe_open

    with safe_open(str(distill_file), "pt") as fh:
        keys = set(fh.keys())
    assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in keys
    assert "diffusion_model.blocks.1.ffn.2.alpha" in keys and not any("lora_A" in k for k in keys)

    served = copy.deepcopy(pipe.transformer)
    cache = AdapterCache(served, resolve_adapters(model), max_loaded=1)
    cache.activate(NAME)
    got, _ = run(pipe, served, embeds, steps=4, guidance=1.0)
    want, _ = run(pipe, merged_by_hand(pipe.transformer, distill_file), embeds, steps=4, guidance=1.0)
    base, _ = run(pipe, pipe.transformer, embeds, steps=4, guidance=1.0)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(got - base).max() > 1e-2  # the adapter does change the output
    cache.deactivate()
    np.testing.assert_array_equal(run(pipe, served, embeds, steps=4, guidance=1.0)[0], base)


@pytest.mark.fast
def test_the_adapter_defaults_apply_and_explicit_values_win(pipe, embeds, model):
    plain = resolve_spec(GenerationSpec(prompt="a fox", seed=1), model)
    assert (plain.num_inference_steps, plain.guidance_scale, plain.lora) == (6, 6.0, None)  # the model defaults
    fast = resolve_spec(GenerationSpec(prompt="a fox", seed=1, lora={"name": NAME}), model)
    assert (fast.num_inference_steps, fast.guidance_scale, fast.flow_shift) == (4, 1.0, 5.0)
    assert fast.lora.name == NAME and fast.lora.scale == 1.0
    mine = resolve_spec(GenerationSpec(prompt="a fox", seed=1, lora={"name": NAME}, num_inference_steps=6,
                                       guidance_scale=3.0), model)
    assert (mine.num_inference_steps, mine.guidance_scale, mine.flow_shift) == (6, 3.0, 5.0)
    with pytest.raises(InvalidSpecError, match="between 1 and 8") as err:
        resolve_spec(GenerationSpec(prompt="a fox", lora={"name": NAME}, num_inference_steps=9), model)
    assert err.value.param == "num_inference_steps"

    # and it runs so: 4 steps, one forward each (guidance 1: no unconditional branch); CFG doubles them
    served = copy.deepcopy(pipe.transformer)
    AdapterCache(served, resolve_adapters(model), max_loaded=1).activate(NAME)
    _, forwards = run(pipe, served, embeds, fast.num_inference_steps, fast.guidance_scale, fast.flow_shift)
    assert forwards == 4
    _, forwards = run(pipe, served, embeds, mine.num_inference_steps, mine.guidance_scale, mine.flow_shift)
    assert forwards == 2 * 6


@pytest.mark.fast
def test_the_presets_commented_distill_entry_is_a_valid_adapter():
    text = (ROOT / "configs" / "skyreels-v2-t2v-14b-540p.yaml").read_text()
    block = re.search(r"# >>> distilled fast mode\n(.*?)# <<<", text, re.S)
    assert block, "the preset lost its distilled fast-mode entry"
    import yaml

    lines = [re.sub(r"^(\s*)# ?", r"\1", line) for line in block.group(1).splitlines()]
    lora = yaml.safe_load("\n".join(lines))["lora"]
    (adapter,) = [LoraAdapterConfig.model_validate(a) for a in lora["adapters"]]
    assert adapter.request_defaults() == {"num_inference_steps": 4, "guidance_scale": 1.0, "flow_shift": 5.0}
    assert adapter.path == "lightx2v/Wan2.1-Distill-Loras"
