"""Per-request LoRA adapters (`serve.pipeline.lora`) on the tiny model, in process (CPU, fp32):
CineVivid's DenoiseLoop on a transformer whose `AdapterCache` activated an adapter reproduces
diffusers' `SkyReelsV2Pipeline` with `load_lora_weights` + `set_adapters` (frames, max |Δ| ≤ 1e-5);
switching adapters and back to none gives what fresh transformers give."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from serve.config import LoraAdapterConfig, LoraAdaptersConfig, ModelConfig
from serve.pipeline.denoising import DenoiseJob, DenoiseLoop, LoopSettings, clone_scheduler_config
from serve.pipeline.lora import (AdapterCache, AdapterResolveError, UnknownAdapter, resolve_adapters,
                                 scan_adapters_dir)
from serve.pipeline.text_encoding import encode_prompts
from tests.tiny_fixtures import one_thread, pipe  # noqa: F401 - the module's fixtures
from serve.pipeline.tiny_model import make_tiny_lora, make_tiny_loras
from serve.pipeline.vae_decode import denormalize_and_decode, to_float_frames

W, H, F, STEPS, GUIDANCE, SHIFT = 64, 64, 9, 3, 6.0, 8.0
PROMPT, NEGATIVE, SEED = "a cat walks on the grass", "low quality", 7
SCALE = 0.8
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def loras(pipe, tmp_path_factory):
    """style-a and style-b, written next to a (nominal) tiny model folder, as `make_tiny_loras` does."""
    model_dir = tmp_path_factory.mktemp("models") / "tiny"
    return make_tiny_loras(model_dir, transformer=pipe.transformer)


@pytest.fixture(scope="module")
def adapters(loras):
    return resolve_adapters(LoraAdaptersConfig(adapters_dir=str(next(iter(loras.values())).parent)))


@pytest.fixture(scope="module")
def embeds(pipe):
    cond = encode_prompts(pipe.tokenizer, pipe.text_encoder, [PROMPT], 512, CPU)
    uncond = encode_prompts(pipe.tokenizer, pipe.text_encoder, [NEGATIVE], 512, CPU)
    return cond, uncond


def loop_latents(pipe, transformer, embeds) -> np.ndarray:
    cond, uncond = embeds
    loop = DenoiseLoop(transformer, clone_scheduler_config(pipe.scheduler), CPU)
    job = DenoiseJob(seed=SEED, prompt_embeds=cond, negative_prompt_embeds=uncond)
    loop.run([job], LoopSettings(width=W, height=H, num_frames=F, num_inference_steps=STEPS,
                                 guidance_scale=GUIDANCE, flow_shift=SHIFT))
    return job.result


def decode(pipe, latents: np.ndarray) -> np.ndarray:
    return to_float_frames(denormalize_and_decode(pipe.vae, torch.from_numpy(latents)))


@pytest.fixture(scope="module")
def fresh(pipe, embeds, adapters):
    """Latents of fresh transformers: the base one (never had a LoRA), and copies of it that only
    ever loaded one adapter, at SCALE. Computed once each."""
    done: dict = {}

    def get(name: str | None) -> np.ndarray:
        if name not in done:
            transformer = pipe.transformer
            if name is not None:
                transformer = copy.deepcopy(pipe.transformer)
                cache = AdapterCache(transformer, adapters, max_loaded=1)
                cache.activate(name, SCALE)
            done[name] = loop_latents(pipe, transformer, embeds)
        return done[name]

    return get


@pytest.mark.fast
def test_adapter_reproduces_diffusers_pipeline_with_lora(pipe, embeds, loras, fresh):
    # diffusers: the pipeline loads the LoRA folder itself, on its own copy of the transformer
    from diffusers import SkyReelsV2Pipeline

    ref_pipe = SkyReelsV2Pipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder,
                                  transformer=copy.deepcopy(pipe.transformer), vae=pipe.vae,
                                  scheduler=copy.deepcopy(pipe.scheduler))
    ref_pipe.load_lora_weights(str(loras["style-a"]), adapter_name="style-a")
    ref_pipe.set_adapters(["style-a"], [SCALE])
    out = ref_pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=H, width=W, num_frames=F,
                   num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   generator=torch.Generator().manual_seed(SEED), output_type="np")
    ref = np.asarray(out.frames[0], dtype=np.float32)

    frames = decode(pipe, fresh("style-a"))
    assert frames.shape == ref.shape
    assert np.abs(frames - ref).max() <= 1e-5
    # ... and the adapter matters: the base model's frames are clearly different
    base = decode(pipe, fresh(None))
    assert np.abs(base - ref).mean() > 1e-3 and np.abs(base - ref).max() > 0.05


def test_switching_adapters_matches_fresh_transformers(pipe, embeds, adapters, fresh):
    transformer = copy.deepcopy(pipe.transformer)
    cache = AdapterCache(transformer, adapters, max_loaded=1)

    cache.activate("style-a", SCALE)
    a = loop_latents(pipe, transformer, embeds)
    assert cache.loaded == ["style-a"] and (cache.loads, cache.evictions, cache.hits) == (1, 0, 0)

    cache.activate("style-b", SCALE)  # max_loaded=1: style-a goes
    b = loop_latents(pipe, transformer, embeds)
    assert cache.loaded == ["style-b"] and (cache.loads, cache.evictions, cache.hits) == (2, 1, 0)
    assert set(transformer.peft_config) == {"style-b"}

    cache.deactivate()
    base = loop_latents(pipe, transformer, embeds)
    assert cache.active is None and cache.loaded == ["style-b"]

    cache.activate("style-b", SCALE)  # still loaded: a hit
    assert (cache.loads, cache.evictions, cache.hits) == (2, 1, 1)
    assert cache.stats()["active"] == "style-b"

    np.testing.assert_array_equal(a, fresh("style-a"))
    np.testing.assert_array_equal(b, fresh("style-b"))
    # a deactivated adapter leaves the base model bit for bit (PEFT layers pass their base layer through)
    np.testing.assert_array_equal(base, fresh(None))
    assert np.abs(a - b).max() > 1e-2 and np.abs(a - base).max() > 1e-2


def test_lru_keeps_the_recently_used_adapters(pipe, adapters):
    transformer = copy.deepcopy(pipe.transformer)
    cache = AdapterCache(transformer, {**adapters, "style-c": adapters["style-a"].__class__(
        name="style-c", file=adapters["style-a"].file, source="copy")}, max_loaded=2)
    cache.activate("style-a")
    cache.activate("style-b")
    cache.activate("style-a")  # hit: style-b is now the least recently used
    cache.activate("style-c")
    assert cache.loaded == ["style-a", "style-c"]
    assert (cache.loads, cache.evictions, cache.hits) == (3, 1, 1)
    assert set(transformer.peft_config) == {"style-a", "style-c"}
    cache.unload_all()
    assert cache.loaded == [] and not getattr(transformer, "peft_config", {})


def test_unknown_adapter_names_it_and_the_known_ones(pipe, adapters):
    cache = AdapterCache(copy.deepcopy(pipe.transformer), adapters, max_loaded=1)
    with pytest.raises(UnknownAdapter, match=r"'nope'.*'style-a', 'style-b'") as info:
        cache.activate("nope")
    assert isinstance(info.value, ValueError) and info.value.name == "nope"
    assert cache.loads == 0 and cache.loaded == []


def test_adapters_dir_scan_and_config(loras, tmp_path, pipe):
    folder = next(iter(loras.values())).parent
    assert set(scan_adapters_dir(folder)) == {"style-a", "style-b"}
    # a bare .safetensors file is an adapter named by its stem; a listed adapter of the same name wins
    make_tiny_lora(tmp_path / "x", pipe.transformer, seed=5)
    (tmp_path / "x" / "pytorch_lora_weights.safetensors").rename(tmp_path / "grain.safetensors")
    (tmp_path / "not an adapter.safetensors").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    assert set(scan_adapters_dir(tmp_path)) == {"grain"}
    cfg = ModelConfig.model_validate({"lora": {
        "adapters_dir": str(tmp_path), "max_loaded": 2,
        "adapters": [{"name": "turbo", "path": str(loras["style-a"]), "scale": 0.5, "num_inference_steps": 4,
                      "guidance_scale": 1.0},
                     {"name": "grain", "path": str(tmp_path / "grain.safetensors"), "scale": 0.3}]}})
    specs = resolve_adapters(cfg)
    assert set(specs) == {"grain", "turbo"}
    assert specs["grain"].scale == 0.3 and specs["grain"].file == (tmp_path / "grain.safetensors").resolve()
    assert specs["turbo"].defaults == {"num_inference_steps": 4, "guidance_scale": 1.0}
    assert specs["turbo"].file.name == "pytorch_lora_weights.safetensors"
    assert AdapterCache.from_config(pipe.transformer, cfg).max_loaded == 2


def test_config_validation_and_resolve_errors(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="used twice"):
        LoraAdaptersConfig(adapters=[LoraAdapterConfig(name="a", path="x"), LoraAdapterConfig(name="a", path="y")])
    with pytest.raises(ValidationError, match="no dots"):
        LoraAdapterConfig(name="style.v2", path="x")
    assert ModelConfig().lora.adapters == [] and not ModelConfig().lora.enabled
    with pytest.raises(AdapterResolveError, match="'gone'.*does not exist"):
        resolve_adapters(LoraAdaptersConfig(adapters=[LoraAdapterConfig(name="gone", path=str(tmp_path / "no"))]))
    with pytest.raises(AdapterResolveError, match="'hub'.*not in the local Hugging Face cache"):
        resolve_adapters(LoraAdaptersConfig(adapters=[LoraAdapterConfig(name="hub", path="someone/no-such-lora")]))
    with pytest.raises(AdapterResolveError, match="no .safetensors"):
        resolve_adapters(LoraAdaptersConfig(adapters=[LoraAdapterConfig(name="empty", path=str(tmp_path))]))


def test_a_model_format_adapter_loads_without_the_transformer_prefix(pipe, adapters, tmp_path):
    """`transformer.save_lora_adapter` writes keys without "transformer."; diffusers'
    `load_lora_adapter(prefix="transformer")` would drop them all (a warning, nothing loaded)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    first = copy.deepcopy(pipe.transformer)
    AdapterCache(first, adapters, max_loaded=1).activate("style-a")
    first.save_lora_adapter(tmp_path / "model-format", adapter_name="style-a")
    with safe_open(tmp_path / "model-format" / "pytorch_lora_weights.safetensors", "pt") as f:
        assert not any(k.startswith("transformer.") for k in f.keys())
    second = copy.deepcopy(pipe.transformer)
    specs = resolve_adapters(LoraAdaptersConfig(adapters=[
        LoraAdapterConfig(name="style-a", path=str(tmp_path / "model-format"))]))
    AdapterCache(second, specs, max_loaded=1).activate("style-a")
    want = get_peft_model_state_dict(first, adapter_name="style-a")
    got = get_peft_model_state_dict(second, adapter_name="style-a")
    assert want.keys() == got.keys() and len(want) == 40
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert second.peft_config["style-a"].lora_alpha == first.peft_config["style-a"].lora_alpha


def test_an_adapter_of_another_model_fails_cleanly(pipe, embeds, adapters, fresh, tmp_path):
    from diffusers import SkyReelsV2Transformer3DModel

    from serve.pipeline.lora import AdapterLoadError, AdapterSpec

    other = SkyReelsV2Transformer3DModel.from_config({**pipe.transformer.config, "ffn_dim": 64})
    file = make_tiny_lora(tmp_path / "other", other, seed=3) / "pytorch_lora_weights.safetensors"
    transformer = copy.deepcopy(pipe.transformer)
    cache = AdapterCache(transformer, {**adapters, "other": AdapterSpec(name="other", file=file, source="x")},
                         max_loaded=2)
    with pytest.raises(AdapterLoadError, match="'other'.*does not fit"):
        cache.activate("other")
    assert cache.loaded == [] and cache.loads == 0 and "other" not in getattr(transformer, "peft_config", {})
    cache.activate("style-a", SCALE)
    assert cache.loaded == ["style-a"] and set(transformer.peft_config) == {"style-a"}
    # nothing of the failed load is left in the layers
    np.testing.assert_array_equal(loop_latents(pipe, transformer, embeds), fresh("style-a"))
