"""Images with diffusers: a Stable Diffusion pipeline from a diffusers folder or a single-file checkpoint.

The device is chosen here: CUDA, then Apple MPS, then the CPU, with a dtype that suits it. img2img
reuses the loaded components (``from_pipe``), never the weights a second time. Each step reports
progress, and a job whose client went away stops at the next step.
"""

from __future__ import annotations

import base64
import contextlib
import io
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from proxy.wire import SAMPLERS, Image, ImageRequest, ImageResult
from proxy.worker.backends.base import InvalidRequest, TooLarge


class Cancelled(Exception):
    """The client went away; the job stopped at a step boundary."""


_LOADING_COMPONENTS = "Loading pipeline components..."  # diffusers' own progress bar over them


@contextlib.contextmanager
def _components_counted(report: Callable[[float], None]) -> Iterator[None]:
    """Report the share of pipeline components loaded while the block runs. diffusers loads them in a loop
    over ``diffusers.utils.logging.tqdm(components, desc=_LOADING_COMPONENTS)`` (``from_pretrained`` and
    ``from_single_file``); that tqdm is wrapped for the block to count the loop's items as they are taken."""
    from diffusers.utils import logging as dlogging

    original = dlogging.tqdm

    def counted(items: list[Any], bar: Any) -> Iterator[Any]:
        for done, item in enumerate(bar):
            report(done / max(1, len(items)))
            yield item
        report(1.0)

    class Counting:
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("desc") != _LOADING_COMPONENTS or not args:
                return original(*args, **kwargs)
            items = list(args[0])
            return counted(items, original(items, *args[1:], **kwargs))

        def __getattr__(self, name: str) -> Any:
            return getattr(original, name)

    dlogging.tqdm = Counting()
    try:
        yield
    finally:
        dlogging.tqdm = original


class DiffusersBackend:
    def __init__(self, name: str, model_path: str, options: dict[str, Any]) -> None:
        self.name = name
        self.path = Path(model_path)
        self.options = dict(options)
        self.pipe: Any = None
        self._img2img: Any = None
        self.device = "cpu"
        self.dtype = "float32"
        self.step = 0
        self.total = 0
        self.busy = False
        self._loaded_parts = 0.0  # pipeline components loaded / all of them, while it loads

    def prepare(self) -> None:
        import diffusers  # noqa: F401
        import torch  # noqa: F401

    def _device(self, torch: Any) -> tuple[str, Any]:
        wanted = self.options.get("device", "auto")
        if wanted == "auto":
            if torch.cuda.is_available():
                wanted = "cuda"
            elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
                wanted = "mps"
            else:
                wanted = "cpu"
        dtype_name = self.options.get("dtype", "auto")
        if dtype_name == "auto":
            dtype_name = "float16" if wanted in ("cuda", "mps") else "float32"
        return wanted, getattr(torch, dtype_name)

    def load(self) -> None:
        import torch
        from diffusers import StableDiffusionPipeline

        if self.options.get("threads"):
            torch.set_num_threads(int(self.options["threads"]))
        device, dtype = self._device(torch)
        common = {
            "torch_dtype": dtype,
            "local_files_only": True,
            "safety_checker": None,
            "requires_safety_checker": False,
        }
        with _components_counted(self._set_loaded_parts):
            if self.path.is_dir():
                pipe = StableDiffusionPipeline.from_pretrained(self.path, **common)
            else:
                config = self.options.get("config")
                if not config:
                    raise FileNotFoundError("a single-file checkpoint needs model.config: a local diffusers folder")
                pipe = StableDiffusionPipeline.from_single_file(str(self.path), config=config, **common)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(device)
        self.device, self.dtype = device, str(dtype).removeprefix("torch.")

    def _set_loaded_parts(self, fraction: float) -> None:
        self._loaded_parts = fraction

    def progress(self) -> float:
        """Components loaded / all of them (to 0.9; moving the pipeline to its device is the rest)."""
        return 1.0 if self.pipe is not None else 0.9 * self._loaded_parts

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "backend": "diffusers",
            "device": self.device,
            "dtype": self.dtype,
            "job": {"step": self.step, "total_steps": self.total} if self.busy else None,
        }
        if self.device == "cuda":
            import torch

            out["vram_bytes"] = int(torch.cuda.memory_allocated())
        return out

    def close(self) -> None:
        self.pipe = self._img2img = None

    def _scheduler(self, name: str | None) -> None:
        import diffusers

        wanted = (name or self.options.get("scheduler") or "").lower()
        if not wanted:
            return
        cls_name = SAMPLERS.get(wanted)
        if cls_name is None:
            raise InvalidRequest(f"unknown sampler '{name}'; samplers: {', '.join(SAMPLERS)}", param="sampler")
        if type(self.pipe.scheduler).__name__ != cls_name:
            self.pipe.scheduler = getattr(diffusers, cls_name).from_config(self.pipe.scheduler.config)
            self._img2img = None

    def _init_size(self, image: Any, max_size: int) -> tuple[int, int]:
        """The init image's size, scaled down to fit ``max_size`` and rounded down to the pipeline's
        multiple (``vae_scale_factor``, 8 for Stable Diffusion), as diffusers' own image processor does."""
        w, h = image.size
        scale = min(1.0, max_size / max(w, h))
        multiple = int(getattr(self.pipe, "vae_scale_factor", 8) or 8)
        return tuple(max(multiple, int(x * scale) // multiple * multiple) for x in (w, h))  # type: ignore[return-value]

    def _init_image(self, data: str, width: int, height: int, own_size: int | None = None) -> Any:
        from PIL import Image

        limit = int(self.options.get("max_image_pixels") or 4096 * 4096)
        try:
            image = Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[-1])))  # reads the header only
        except Image.DecompressionBombError as exc:  # PIL's own cap, far above ours
            raise TooLarge(f"'init_image' is too large: {exc}", param="init_image") from exc
        except Exception as exc:  # PIL's errors for anything it cannot read
            raise InvalidRequest(f"'init_image' is not an image: {exc}", param="init_image") from exc
        w, h = image.size
        if w * h > limit:  # refused before the pixels are decoded
            raise TooLarge(f"'init_image' is {w}x{h} = {w * h} pixels; the limit is {limit}", param="init_image")
        if own_size is not None:
            width, height = self._init_size(image, own_size)
        try:
            return image.convert("RGB").resize((width, height))
        except Exception as exc:  # a header that reads but pixels that do not
            raise InvalidRequest(f"'init_image' is not an image: {exc}", param="init_image") from exc

    def images(self, body: ImageRequest, cancel: threading.Event) -> ImageResult:
        """Generate ``n`` images for the canonical request; PNGs as base64 with the seed of each."""
        import torch
        from diffusers import AutoPipelineForImage2Image

        started = time.perf_counter()
        self._scheduler(body.get("scheduler"))
        width, height = int(body["width"]), int(body["height"])
        steps = int(body["steps"])
        init = body.get("init_image")
        pipe = self.pipe
        kwargs: dict[str, Any] = {}
        if init:
            if self._img2img is None:
                self._img2img = AutoPipelineForImage2Image.from_pipe(self.pipe)
            pipe = self._img2img
            own = int(body.get("max_size") or 1024) if body.get("size_from_init") else None
            image = self._init_image(init, width, height, own)
            width, height = image.size
            kwargs = {"image": image, "strength": float(body.get("strength", 0.75))}
        else:
            kwargs = {"width": width, "height": height}
        seed = int(body["seed"])

        def on_step(p: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            self.step = step + 1
            if cancel.is_set():
                p._interrupt = True
            return tensors

        out: list[Image] = []
        self.busy = True
        try:
            for i in range(int(body.get("n", 1))):
                self.step, self.total = 0, steps
                generator = torch.Generator(device="cpu").manual_seed(seed + i)
                result = pipe(
                    prompt=body["prompt"],
                    negative_prompt=body.get("negative_prompt") or None,
                    num_inference_steps=steps,
                    guidance_scale=float(body["guidance_scale"]),
                    generator=generator,
                    callback_on_step_end=on_step,
                    **kwargs,
                )
                if cancel.is_set():
                    raise Cancelled()
                buf = io.BytesIO()
                result.images[0].save(buf, format="PNG")
                out.append(
                    {
                        "base64": base64.b64encode(buf.getvalue()).decode(),
                        "seed": seed + i,
                        "width": width,
                        "height": height,
                    }
                )
        finally:
            self.busy = False
        return {"images": out, "processing_time": time.perf_counter() - started}
