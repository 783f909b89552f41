"""A small grid of samples of the swarm's current ensemble for the status page.

Sampling is slow (an assembly fetches every expert's inference export, then a few denoising steps),
so it never runs on a request: `request()` only asks for a new grid; one worker thread assembles
through `node.generator.client.assemble_ensemble` and samples a handful of images at a low step
count, one grid at a time. A request while one is being made is folded into it.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from node.errors import NodeError
from protocol.manifest import SwarmManifest

logger = logging.getLogger("ddm_swarm.web")
DEFAULT_PROMPTS = ("the digit 0", "the digit 3", "the digit 5", "the digit 7")
SAMPLE_STEPS = 8  # a rough look, not a final image
PER_PROMPT = 2
SCALE = 6  # pixels per image pixel in the PNG


class SampleGrid:
    """The latest grid (PNG bytes) of the ensemble, made on request in a worker thread."""

    def __init__(self, manifest: SwarmManifest, initial_peers: Sequence[str], cache_dir: Optional[Path] = None,
                 prompts: Sequence[str] = DEFAULT_PROMPTS, steps: int = SAMPLE_STEPS):
        self.manifest, self.initial_peers, self.cache_dir = manifest, list(initial_peers), cache_dir
        self.prompts, self.steps = list(prompts)[:8], steps  # bounded: at most 8 prompts x PER_PROMPT images
        self.png: Optional[bytes] = None
        self.made_at: Optional[float] = None
        self.state = "none"  # none | making | ready | failed
        self.message = ""
        self._wanted = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ddm-web-samples", daemon=True)
        self._thread.start()

    def request(self) -> None:
        """Ask for a new grid (returns at once)."""
        self._wanted.set()

    def describe(self) -> dict:
        return {"state": self.state, "message": self.message, "made_at": self.made_at,
                "prompts": self.prompts, "steps": self.steps}

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._wanted.wait(0.5):
                continue
            self._wanted.clear()
            self.state, self.message = "making", "assembling the ensemble"
            try:
                self.png = self._make()
                self.made_at, self.state, self.message = time.time(), "ready", ""
            except NodeError as error:  # no ensemble yet, nobody reachable: shown on the page
                self.state, self.message = "failed", str(error)
            except Exception as error:  # a bug: logged with its traceback, shown, the server keeps serving
                logger.exception("making the sample grid failed")
                self.state, self.message = "failed", f"{type(error).__name__}: {error}"

    def _make(self) -> bytes:
        from ddm_models.images import to_grid
        from node.generator.client import assemble_ensemble

        ensemble = assemble_ensemble(self.manifest, initial_peers=self.initial_peers, cache_dir=self.cache_dir)
        self.message = f"sampling {len(self.prompts) * PER_PROMPT} images at {self.steps} steps"
        rows = [prompt for prompt in self.prompts for _ in range(PER_PROMPT)]
        with torch.no_grad():
            result = ensemble.sample(rows, steps=self.steps, seed=0)
        if result.images.shape[1] not in (1, 3):
            raise NodeError("this swarm's experts produce latents; the page cannot decode them")
        buffer = io.BytesIO()
        to_grid(result.images, PER_PROMPT, scale=SCALE).save(buffer, format="PNG")
        return buffer.getvalue()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
