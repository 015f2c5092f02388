"""One rank of the 2-way sequence-parallel group of tests/test_parallel.py (run with torch.multiprocessing,
gloo): loads the tiny model's transformer, splits it with `serve.pipeline.parallel.enable_context_parallel`,
runs the T2V loop and a DF job on the inputs the test wrote, and rank 0 saves the latents."""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch


def run_rank(rank: int, world: int, port: int, work: str, model_dir: str, df_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from diffusers import SkyReelsV2Transformer3DModel, UniPCMultistepScheduler

        from serve.pipeline.denoising import DenoiseJob, DenoiseLoop, LoopSettings
        from serve.pipeline.diffusion_forcing import DFJob, DFSettings, DiffusionForcingLoop
        from serve.config import ParallelConfig
        from serve.pipeline.parallel import enable_context_parallel

        t0 = time.perf_counter()
        inputs = dict(np.load(os.path.join(work, "inputs.npz")))
        cpu = torch.device("cpu")
        out = {}
        for name, folder in (("t2v", model_dir), ("df", df_dir)):
            transformer = SkyReelsV2Transformer3DModel.from_pretrained(os.path.join(folder, "transformer")).eval()
            scheduler = UniPCMultistepScheduler.from_pretrained(os.path.join(folder, "scheduler"))
            enable_context_parallel(transformer, ParallelConfig(ulysses=world))
            seen: list[int] = []  # the sequence length each block's self-attention sees on this rank
            transformer.blocks[0].attn1.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
            if name == "t2v":
                loop = DenoiseLoop(transformer, scheduler.config, cpu)
                job = DenoiseJob(seed=7, prompt_embeds=inputs["cond"], negative_prompt_embeds=inputs["uncond"])
                loop.run([job], LoopSettings(**T2V))
            else:
                loop = DiffusionForcingLoop(transformer, dict(scheduler.config), cpu)
                job = DFJob(seed=7, prompt_embeds=inputs["df_cond"], negative_prompt_embeds=inputs["df_uncond"])
                loop.run(job, DFSettings(flow_shift=scheduler.config.flow_shift, **DF))
            out[name] = job.result
            out[f"{name}_tokens_seen"] = np.array(sorted(set(seen)))
        print(f"rank {rank}: loops done in {time.perf_counter() - t0:.1f}s", flush=True)
        if rank == 0:
            np.savez(os.path.join(work, "parallel.npz"), **out)
    finally:
        torch.distributed.destroy_process_group()


# the jobs: T2V 64x64x9 (48 DiT tokens), DF 32x32, 25 frames in 3 windows (16, 16, 12 tokens), synchronous
T2V = dict(width=64, height=64, num_frames=9, num_inference_steps=3, guidance_scale=6.0, flow_shift=8.0)
DF = dict(width=32, height=32, num_frames=25, num_inference_steps=3, fps=24, base_num_frames=13, overlap_history=5,
          ar_step=0, causal_block_size=1, addnoise_condition=20.0, guidance_scale=6.0)

if __name__ == "__main__":
    rank, world, port, work, model_dir, df_dir = sys.argv[1:7]
    run_rank(int(rank), int(world), int(port), work, model_dir, df_dir)
