"""The `rectune` command line.

Heavy libraries (torch, lightning, mlflow) are imported inside the commands that use
them, so `rectune --help` and the data commands start fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from models.errors import RectuneError

app = typer.Typer(help="rectune: an LLM-in-the-loop tuner for recommender pipelines.", no_args_is_help=True)
data_app = typer.Typer(help="Inspect and download datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

DataDirOption = typer.Option(None, "--data-dir", help="Directory with one sub-directory per dataset (env RECTUNE_DATA_DIR, or data_dir in rectune.toml; default ./data).")


def fail(error: RectuneError) -> None:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@data_app.command("info")
def data_info(
    name: str = typer.Argument(..., help="A registered dataset name (see `rectune data list`)."),
    data_dir: Optional[Path] = DataDirOption,
    split: Optional[str] = typer.Option(None, help="given | random[:0.8,0.1,0.1] | leave-last-out (default: the dataset's own)."),
    seed: int = typer.Option(42, help="Seed of the random split."),
) -> None:
    """Load a dataset and print its size, split and features as JSON."""
    from models.loaders import load_dataset
    from models.splits import SplitStrategy

    try:
        dataset = load_dataset(name, data_dir, SplitStrategy.parse(split, seed) if split else None)
    except RectuneError as error:
        fail(error)
    typer.echo(json.dumps(dataset.summary(), indent=2))


@data_app.command("list")
def data_list(data_dir: Optional[Path] = DataDirOption) -> None:
    """List the registered datasets and whether each is present in the data directory."""
    from models.config import data_dir as resolve
    from models.loaders import DATASETS

    root = resolve(data_dir)
    for source in DATASETS.values():
        present = "present" if (root / source.directory).is_dir() else "missing"
        typer.echo(f"{source.name:<12} {present:<8} {root / source.directory}  {source.description}")


@data_app.command("pull")
def data_pull(
    name: str = typer.Argument(..., help="A registered dataset name: baby, ml-100k or beauty-2023."),
    data_dir: Optional[Path] = DataDirOption,
    base_url: Optional[str] = typer.Option(None, "--base-url", help="Fetch each file as BASE_URL/<file name> from a mirror (env RECTUNE_DOWNLOAD_BASE_URL)."),
    force: bool = typer.Option(False, "--force", help="Download again even when the files are present."),
    timeout: float = typer.Option(60.0, help="Seconds to wait for a connection and for each read."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on stderr."),
) -> None:
    """Download a dataset's public source into the data directory, load it to check it, print its summary."""
    from models.download import pull

    try:
        result = pull(name, data_dir, base_url=base_url, progress=progress, force=force, timeout=timeout)
    except RectuneError as error:
        fail(error)
    for path in result.downloaded:
        typer.echo(f"downloaded {path}")
    for path in result.skipped:
        typer.echo(f"present    {path} (--force downloads it again)")
    typer.echo(json.dumps(result.summary, indent=2))


if __name__ == "__main__":
    app()
