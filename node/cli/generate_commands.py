"""`ddm-swarm generate` and `ddm-swarm fetch`: assemble the ensemble, sample, write PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.markup import escape
from rich.table import Table

from node.cli.app import (DeviceOption, InitialPeersOption, SwarmOption, app, checked_device, console, fail,
                          setup_logging)
from node.errors import NodeError

MAX_PROMPT_CHARS = 1000
MAX_IMAGES = 1024


def check_prompts(prompts: List[str], per_prompt: int) -> List[str]:
    """Refuse prompts a user cannot mean: empty, absurdly long, or too many images at once."""
    if not prompts:
        raise NodeError("give at least one prompt, e.g. ddm-swarm generate \"the digit 7\"")
    for prompt in prompts:
        if not prompt.strip():
            raise NodeError("a prompt is empty; write what the image should show")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise NodeError(f"a prompt is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS} "
                            "(the text encoder reads only the first few dozen tokens anyway)")
    if per_prompt < 1 or len(prompts) * per_prompt > MAX_IMAGES:
        raise NodeError(f"--num must be >= 1 and prompts x --num at most {MAX_IMAGES}")
    return [p.strip() for p in prompts]


class FetchProgress:
    """A rich progress bar per blob being downloaded."""

    def __init__(self, console: Console):
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                            console=console, transient=True)
        self.tasks = {}

    def __call__(self, what: str, done: int, total: int) -> None:
        if what not in self.tasks:
            self.tasks[what] = self.bar.add_task(f"fetch {what}", total=total)
        self.bar.update(self.tasks[what], completed=done)


def ensemble_table(ensemble) -> Table:
    table = Table(title=f"ensemble of swarm '{ensemble.manifest.name}'")
    for column in ("job", "model", "objective", "step", "held-out", "signer", "checkpoint"):
        table.add_column(column)
    for row in ensemble.describe():
        table.add_row(*map(escape, (row["job"], row["model"], row["objective"], str(row["step"]),
                                    f"{row['heldout']:.4f}", row["signer"] + "…", row["sha256"][:16] + "…")))
    return table


def obtain_ensemble(console: Console, swarm: str, initial_peers: Optional[List[str]], cache_dir: Optional[Path],
                    verify: bool, from_dir: Optional[Path], device: str = "auto"):
    """The ensemble from the swarm (or saved in `from_dir`); with `verify`, held-out losses are
    measured on `device`."""
    from node.generator.assembly import Ensemble
    from node.generator.client import assemble_ensemble

    if from_dir is not None:
        return Ensemble.load(from_dir)
    progress = FetchProgress(console)
    with progress.bar:
        ensemble = assemble_ensemble(swarm, initial_peers=initial_peers or (), cache_dir=cache_dir, verify=verify,
                                     progress=progress, device=device)
    print_rejections(console, ensemble.rejected)
    return ensemble


def print_rejections(console: Console, rejected) -> None:
    """One line per refused candidate. Reasons quote strangers' headers and p2pd's error text
    (`[/ddm-swarm/blob/1]`): printed as text, never read as markup."""
    for sha, reason in rejected:
        console.print(f"[yellow]not used[/] {escape(sha[:16])}…: {escape(reason)}")


def run_generate(console: Console, prompts: List[str], *, swarm: str, initial_peers, routing, steps, guidance,
                 seed: int, per_prompt: int, out: Path, cache_dir, verify: bool, from_dir, scale: int,
                 device: str = "auto", offload: bool = False, batch_size: Optional[int] = None) -> Path:
    prompts = check_prompts(prompts, per_prompt)
    if batch_size is not None and batch_size < 1:
        raise NodeError(f"--batch-size must be >= 1, got {batch_size}")
    from ddm_models.devices import resolve_device  # torch, once the prompts are known good
    from ddm_models.images import save_grid, save_prompt_grid

    target = resolve_device(checked_device(device))  # a typo or an absent GPU fails before anything is fetched
    ensemble = obtain_ensemble(console, swarm, initial_peers, cache_dir, verify, from_dir, device=str(target))
    results = Console()  # results on stdout; logs and progress stay on stderr
    results.print(ensemble_table(ensemble))
    rows = [p for p in prompts for _ in range(per_prompt)]
    result = ensemble.sample(rows, routing=routing, steps=steps, guidance=guidance, seed=seed, device=str(target),
                             offload=offload, batch_size=batch_size)
    if result.images.shape[1] not in (1, 3):
        raise NodeError(f"the ensemble produced {result.images.shape[1]}-channel samples: this swarm's experts "
                        "work on latents but its manifest names no VAE to decode them")
    if result.images.shape[1] == 3:  # colour images of free-text prompts: each prompt written under its images
        path = save_prompt_grid(result.images.float().cpu(), rows, out, columns=per_prompt, scale=scale)
    else:
        path = save_grid(result.images.float().cpu(), per_prompt, out, scale=scale)
    used = ", ".join(f"expert/{k}: {n}" for k, n in sorted(result.evaluations.items()))
    results.print(f"expert evaluations (sample x step): {used}")
    results.print(f"wrote {len(rows)} images to [bold]{path}[/] (one row per prompt)")
    return path


@app.command()
def generate(
    prompts: List[str] = typer.Argument(..., help="Prompts; the grid has one row per prompt."),
    swarm: str = SwarmOption,
    initial_peers: Optional[List[str]] = InitialPeersOption,
    routing: Optional[str] = typer.Option(None, help="top1, top2 (default), top3 or full."),
    steps: Optional[int] = typer.Option(None, help="Sampling steps (default: the swarm's)."),
    guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance scale (default: the swarm's)."),
    seed: int = typer.Option(0, help="The same seed and prompts give the same images."),
    num: int = typer.Option(4, "--num", "-n", help="Images per prompt."),
    out: Path = typer.Option(Path("samples.png"), help="PNG grid to write."),
    cache_dir: Optional[Path] = typer.Option(None, help="Checkpoint cache (default ~/.cache/ddm-swarm)."),
    verify: bool = typer.Option(False, help="Measure each expert's held-out loss and the router's accuracy; "
                                "reject ones much worse than they claim."),
    from_dir: Optional[Path] = typer.Option(None, "--from", help="Use an ensemble saved by `ddm-swarm fetch` (offline)."),
    scale: int = typer.Option(4, help="Magnify each image this many times in the PNG."),
    device: str = DeviceOption,
    offload: bool = typer.Option(False, help="Keep the experts on the CPU and move each onto the device when "
                                             "routing needs it (when they do not all fit in GPU memory)."),
    batch_size: Optional[int] = typer.Option(None, help="Sample this many images at a time (default: all at once)."),
) -> None:
    """Assemble the router and experts from the swarm and generate images locally."""
    setup_logging()
    try:
        run_generate(console, prompts, swarm=swarm, initial_peers=initial_peers, routing=routing, steps=steps,
                     guidance=guidance, seed=seed, per_prompt=num, out=out, cache_dir=cache_dir, verify=verify,
                     from_dir=from_dir, scale=scale, device=device, offload=offload, batch_size=batch_size)
    except Exception as error:
        fail(error)

@app.command()
def fetch(
    out: Path = typer.Option(..., help="Folder to save the ensemble in: model_index.json, expert_<k>/ and router/ "
                                       "(config.json + diffusion_pytorch_model.safetensors), the signed records "
                                       "and the manifest."),
    swarm: str = SwarmOption,
    initial_peers: Optional[List[str]] = InitialPeersOption,
    cache_dir: Optional[Path] = typer.Option(None, help="Checkpoint cache (default ~/.cache/ddm-swarm)."),
    verify: bool = typer.Option(False, help="Measure each expert's held-out loss and the router's accuracy "
                                "before accepting them."),
    device: str = DeviceOption,
) -> None:
    """Save the assembled ensemble so `generate --from DIR` works later with no network."""
    setup_logging()
    try:
        ensemble = obtain_ensemble(console, swarm, initial_peers, cache_dir, verify, None,
                                   device=checked_device(device))
        ensemble.save(out)
    except Exception as error:
        fail(error)
    Console().print(ensemble_table(ensemble))
    Console().print(f"saved to [bold]{out}[/]; generate offline with `ddm-swarm generate --from {out} \"…\"`")
