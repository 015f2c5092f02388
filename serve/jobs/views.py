"""What a user sees of a job record: the OpenAI Video object (`GET /v1/videos/{id}`), shared by the
HTTP routes and the webhook payloads so both carry the same shape."""

from __future__ import annotations

import json

from serve.contracts import COMPLETED
from serve.frames import df_window_count

LONG_VIDEO = "long-video"  # the mode shown for a text-to-video job run by diffusion forcing


def video_view(job: dict, preview: dict | None = None) -> dict:
    """`preview`: the state of a running DF job's preview (`ArtifactStore.preview_state`), which
    adds its progress by windows (`windows_done`, `windows_total`, `playable_seconds`). A completed
    DF job shows all its windows done and its whole length playable; a text-to-video job run by
    diffusion forcing shows `mode: "long-video"`."""
    spec = json.loads(job["spec"])
    frames = output_frames(spec)
    duration = job["duration_s"] if job["duration_s"] is not None else frames / spec["fps"]
    is_df = spec.get("base_num_frames") is not None
    if preview is None and is_df and job["status"] == COMPLETED:
        windows = df_window_count(spec["num_frames"], spec["base_num_frames"], spec["overlap_history"],
                                  extend=spec.get("mode") == "extend")
        preview = {"windows_done": windows, "windows_total": windows, "playable_s": round(duration, 3)}
    mode = spec.get("mode", "text-to-video")
    error = None
    if job["error_code"]:
        error = {"code": job["error_code"], "message": job["error_message"] or "", "param": job["error_param"]}
    return {
        "id": job["id"], "object": "video", "created_at": int(job["created_at"]), "status": job["status"],
        "model": job["model"], "progress": int(job["progress"]), "seconds": f"{duration:g}",
        "size": f"{spec['width']}x{spec['height']}", "prompt": job["prompt"],
        "completed_at": int(job["completed_at"]) if job["completed_at"] else None, "expires_at": None,
        "error": error, "remixed_from_video_id": job["remixed_from"], "stage": job["stage"],
        "has_audio": bool(job["has_audio"]), "seed": spec["seed"], "num_frames": frames,
        "fps": spec["fps"], "num_inference_steps": spec["num_inference_steps"],
        # a DF job's windows: while its preview is written, and once it completed; else null (the
        # same keys in webhooks and GET)
        "windows_done": preview["windows_done"] if preview else None,
        "windows_total": preview["windows_total"] if preview else None,
        "playable_seconds": preview["playable_s"] if preview else None,
        "mode": LONG_VIDEO if mode == "text-to-video" and is_df else mode, "extended_from_video_id": spec.get("extended_from_video_id"),
    }


def output_frames(spec: dict) -> int:
    """Frames of the finished video (`ResolvedSpec.output_frames`, from the stored spec's JSON)."""
    if spec.get("mode") == "extend":
        return (spec.get("source_num_frames") or 0) + spec["num_frames"] - spec["overlap_history"]
    return spec["num_frames"]
