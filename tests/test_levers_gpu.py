"""The GPU speed levers, wired and checked on the CPU (tiny model, fp32):

- `levers.transformer_dtype: fp8` (serve.pipeline.fp8): the config parses; the load path picks the
  float8 scheme the hardware runs (dynamic on compute capability >= 8.9, weight-only below) and is
  refused on a CPU with a clear LeverUnavailable, leaving the model untouched; the module filter
  quantises exactly the Linear layers of the transformer blocks (never the embedders, norms or the
  output head); what torchao does on a CPU (weight-only float8, dequantised) runs and stays close
  to the bf16 output.
- `model.attention_backend` (serve.pipeline.attention_backend): every exact backend available on a
  CPU gives the frames of native (<= 1e-5); "auto" is native on a CPU; an unknown backend is a config
  error, one that cannot run here a LeverUnavailable naming what is available.
"""

from __future__ import annotations

import copy

import numpy as np
import pydantic
import pytest
import torch

from serve.config import APPROXIMATE_ATTENTION_BACKENDS, AppArgs, LeversConfig, ModelConfig
from serve.errors import ConfigError, LeverUnavailable
from serve.pipeline.attention_backend import available_backends, resolve_backend, set_attention_backend
from serve.pipeline.denoising import DenoiseJob, DenoiseLoop, LoopSettings, clone_scheduler_config
from serve.pipeline.fp8 import fp8_filter, fp8_linear_count, fp8_mode, quantize_fp8
from serve.pipeline.levers import apply_levers, lever_state
from serve.pipeline.text_encoding import encode_prompts
from tests.tiny_fixtures import one_thread, pipe  # noqa: F401 - the module's fixtures
from serve.pipeline.tiny_model import build_tiny_pipeline

CPU = torch.device("cpu")
W, H, F, STEPS = 64, 64, 9, 3


@pytest.fixture(scope="module")
def embeds(pipe):
    return (encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a red fox in the snow"], 512, CPU),
            encode_prompts(pipe.tokenizer, pipe.text_encoder, ["low quality"], 512, CPU))


def fp8_sized_dit():
    """A tiny SkyReels-V2 DiT whose Linear layers float8 GEMMs take (dims multiples of 16; the
    embedded tiny model's 24-wide attention is not)."""
    from diffusers import SkyReelsV2Transformer3DModel

    torch.manual_seed(0)
    return SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()


def dit_inputs(seed: int = 0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 16, 3, 8, 8, generator=g).to(dtype), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 12, 32, generator=g).to(dtype), return_dict=False)


# -- FP8 ------------------------------------------------------------------------------------------

@pytest.mark.fast
def test_fp8_config_parses_and_refuses_lora_together():
    assert LeversConfig(transformer_dtype="fp8").transformer_dtype == "fp8"
    assert LeversConfig().transformer_dtype == "model"
    with pytest.raises(pydantic.ValidationError, match="transformer_dtype"):
        LeversConfig(transformer_dtype="int4")
    lora = {"adapters": [{"name": "fast", "path": "/models/fast.safetensors"}]}
    with pytest.raises(pydantic.ValidationError, match="fp8 and LoRA adapters"):
        AppArgs.model_validate({"levers": {"transformer_dtype": "fp8"}, "model": {"lora": lora}})
    AppArgs.model_validate({"levers": {"transformer_dtype": "fp8"}})


@pytest.mark.fast
def test_fp8_mode_follows_the_hardware():
    with pytest.raises(LeverUnavailable, match="needs a CUDA GPU") as err:
        fp8_mode(CPU)
    assert isinstance(err.value, ConfigError) and err.value.code == "lever_unavailable"
    assert err.value.param == "levers.transformer_dtype"
    assert fp8_mode("cuda", capability=(9, 0)) == "dynamic"  # Hopper
    assert fp8_mode("cuda", capability=(8, 9)) == "dynamic"  # Ada
    assert fp8_mode("cuda", capability=(8, 0)) == "weight_only"  # A100


@pytest.mark.fast
def test_fp8_filter_selects_the_block_linears_only():
    dit = fp8_sized_dit()
    chosen = {n for n, m in dit.named_modules() if fp8_filter(m, n)}
    block_linears = {n for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")}
    assert chosen == block_linears and len(chosen) == 2 * 10  # q, k, v, out of attn1 + attn2, 2 ffn linears
    kept = {n for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear)} - chosen
    assert "proj_out" in kept and any(n.startswith("condition_embedder.") for n in kept)
    # the embedded tiny model's 24-wide attention projections are no float8 GEMM shape: none chosen
    tiny = build_tiny_pipeline(0).transformer
    assert not any(fp8_filter(m, n) and "attn" in n for n, m in tiny.named_modules())


@pytest.mark.fast
def test_fp8_lever_is_refused_on_cpu_and_leaves_the_model(pipe):
    dit = copy.deepcopy(pipe.transformer)
    with pytest.raises(LeverUnavailable, match="no float8 matmul kernels"):
        apply_levers(dit, None, LeversConfig(transformer_dtype="fp8"), ModelConfig())
    assert fp8_linear_count(dit) == 0 and next(dit.parameters()).dtype == torch.float32
    assert lever_state(transformer=dit)["fp8_linears"] == 0


def test_torchao_weight_only_fp8_on_cpu_quantises_once_and_stays_close():
    """What torchao can run on a CPU: float8 weights dequantised to bf16 for the matmul."""
    pytest.importorskip("torchao")
    dit = fp8_sized_dit()
    bf16 = copy.deepcopy(dit)
    from serve.pipeline.levers import cast_model

    cast_model(bf16, torch.bfloat16)
    x = dit_inputs()
    with torch.no_grad():
        ref = bf16(**x)[0].float()
        assert quantize_fp8(dit, "weight_only") == 20
        assert quantize_fp8(dit, "weight_only") == 20  # once: the second call changes nothing
        out = dit(**x)[0].float()
    weights = dict(dit.named_parameters())
    assert weights["blocks.0.attn1.to_q.weight"].qdata.dtype == torch.float8_e4m3fn
    assert weights["proj_out.weight"].dtype == torch.bfloat16  # the head is kept
    assert weights["condition_embedder.time_embedder.linear_1.weight"].dtype == torch.float32  # kept fp32
    assert weights["blocks.0.norm2.weight"].dtype == torch.float32
    rel = float((out - ref).norm() / ref.norm())
    assert torch.isfinite(out).all() and 0 < rel < 0.1, rel  # float8 (e4m3: 3 mantissa bits) vs bf16


# -- attention backends -------------------------------------------------------------------------

def latents_with(pipe, embeds, backend: str | None) -> np.ndarray:
    dit = copy.deepcopy(pipe.transformer)
    if backend is not None:
        assert set_attention_backend(dit, backend, CPU) == ("native" if backend == "auto" else backend)
        assert lever_state(transformer=dit)["attention_backend"] == ("native" if backend == "auto" else backend)
    loop = DenoiseLoop(dit, clone_scheduler_config(pipe.scheduler), CPU)
    job = DenoiseJob(seed=3, prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1])
    loop.run([job], LoopSettings(width=W, height=H, num_frames=F, num_inference_steps=STEPS, guidance_scale=6.0,
                                 flow_shift=8.0))
    return job.result


@pytest.mark.fast
def test_exact_attention_backends_on_cpu_equal_native(pipe, embeds):
    ref = latents_with(pipe, embeds, None)
    exact = [b for b in available_backends(CPU) if b not in APPROXIMATE_ATTENTION_BACKENDS and b != "flex"]
    assert {"native", "_native_math", "_native_flash"} <= set(exact)
    for backend in ["auto", *exact]:
        np.testing.assert_allclose(latents_with(pipe, embeds, backend), ref, atol=1e-5, err_msg=backend)


@pytest.mark.fast
def test_attention_backend_config_and_refusals(pipe):
    assert ModelConfig().attention_backend == "auto"
    with pytest.raises(pydantic.ValidationError, match="attention_backend"):
        ModelConfig(attention_backend="xformers2")
    assert resolve_backend("auto", CPU) == "native"
    with pytest.raises(LeverUnavailable, match=r"'_native_cudnn' is not available on 'cpu'.*available: \['native'"):
        resolve_backend("_native_cudnn", CPU)
    # on a GPU "auto" is the fastest exact one installed (torch's own SDPA dispatch when no flash-attn
    # package is); a model doing diffusion forcing (masked attention) gets native, and is refused a
    # backend that takes no mask
    assert resolve_backend("auto", "cuda", capability=(9, 0)) in ("_flash_3", "flash", "native")
    assert resolve_backend("auto", "cuda", capability=(9, 0), masked=True) == "native"
    with pytest.raises(LeverUnavailable, match="takes no attention mask"):
        resolve_backend("_native_cudnn", "cuda", capability=(9, 0), masked=True)
    assert resolve_backend("_native_cudnn", "cuda", capability=(9, 0)) == "_native_cudnn"
    if "sage" not in available_backends("cuda", capability=(9, 0)):
        with pytest.raises(LeverUnavailable, match="'sage' is not available"):
            resolve_backend("sage", "cuda", capability=(9, 0))
    # through the load path: a model naming a backend the CPU cannot run is refused
    dit = copy.deepcopy(pipe.transformer)
    with pytest.raises(LeverUnavailable, match="_native_cudnn"):
        apply_levers(dit, None, LeversConfig(), ModelConfig(attention_backend="_native_cudnn", diffusion_forcing=None))
    with pytest.raises(LeverUnavailable, match="takes no attention mask"):  # the embedded default does DF
        apply_levers(dit, None, LeversConfig(), ModelConfig(attention_backend="_native_flash"))
