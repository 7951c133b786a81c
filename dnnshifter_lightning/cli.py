"""The ``dnnshifter`` command (typer). Each command is a thin wrapper over a library function.

    dnnshifter demo --out DIR [--engine torchserve|litserve]
    dnnshifter portfolio build CKPT_DIR --model package.module:Class --out DIR [--datamodule package.module:Class]
                                    [--input-shape C,H,W] [--input-key K --target-key K]
    dnnshifter portfolio show DIR
    dnnshifter archive PORTFOLIO --model-name NAME --export-path STORE [--variants front|all|ID,ID]
    dnnshifter serve STORE --model NAME [--no-auth] [--enable-model-api]
    dnnshifter serve --stop
    dnnshifter litserve PORTFOLIO [--host 127.0.0.1] [--port 8000] [--workers-per-device N]
                        [--api-key KEY | --no-auth] [--config my.yaml]
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from dnnshifter_lightning.demo.run import DEMO_DEFAULTS

app = typer.Typer(
    name="dnnshifter",
    help="DNNShifter for Lightning and TorchServe: IMP -> exact structural pruning -> a served, switching portfolio.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
portfolio_app = typer.Typer(help="Build or inspect a portfolio of structurally pruned variants.", no_args_is_help=True)
app.add_typer(portfolio_app, name="portfolio")
console = Console()


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=1)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", help="Output directory."),
    levels: int = typer.Option(DEMO_DEFAULTS["levels"], help="IMP levels (checkpoints = levels + 1)."),
    prune_fraction: float = typer.Option(DEMO_DEFAULTS["prune_fraction"], help="Fraction of surviving weights pruned per level."),
    epochs_per_level: int = typer.Option(DEMO_DEFAULTS["epochs_per_level"], help="Epochs trained at every level."),
    rewind_to: str = typer.Option(DEMO_DEFAULTS["rewind_to"], help="Rewind point: steps, 'Nit', 'Nep' or 0."),
    width: int = typer.Option(DEMO_DEFAULTS["width"], help="DigitsCNN width (channels of the first stage)."),
    seed: int = typer.Option(DEMO_DEFAULTS["seed"]),
    serve: bool = typer.Option(True, "--serve/--no-serve", help="End by serving the portfolio and switching it."),
    engine: Optional[str] = typer.Option(None, "--engine", help="torchserve or litserve (default: TorchServe "
                                         "while Java 17 is present, else LitServe; the demo says why)."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete OUT first if it exists."),
) -> None:
    """Train with IMP on real digits, build the portfolio, then serve and switch it with TorchServe
    (on 127.0.0.1 with token auth off, which the demo says; `dnnshifter serve` keeps it on) or LitServe."""
    from dnnshifter_lightning.demo.run import run_demo
    from dnnshifter_lightning.serve.torchserve import ServingError

    try:
        run_demo(out, levels=levels, prune_fraction=prune_fraction, epochs_per_level=epochs_per_level,
                 rewind_to=rewind_to, width=width, seed=seed, serve=serve, fresh=fresh, engine=engine,
                 console=console)
    except (ValueError, FileExistsError, ServingError) as exc:
        _fail(exc)


@portfolio_app.command("build")
def portfolio_build(
    ckpt_dir: Path = typer.Argument(..., help="Directory with level_LL.ckpt files written by IterativeMagnitudePruning."),
    model: str = typer.Option(..., "--model", help="The LightningModule class, as package.module:Class."),
    out: Path = typer.Option(..., "--out", help="Portfolio directory to write."),
    datamodule: Optional[str] = typer.Option(None, "--datamodule", help="package.module:Class whose val_dataloader() measures accuracy."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Input shape without batch, e.g. 3,32,32 (default: the model's example_input_array or the validation batches)."),
    input_key: Optional[str] = typer.Option(None, "--input-key", help="Key of the inputs in dict batches."),
    target_key: Optional[str] = typer.Option(None, "--target-key", help="Key of the labels in dict batches."),
) -> None:
    """Structurally prune level checkpoints trained elsewhere into a portfolio."""
    from dnnshifter_lightning.shrink.build import portfolio_build_command

    try:
        portfolio_build_command(ckpt_dir, model, out, datamodule, input_shape=input_shape, input_key=input_key,
                                target_key=target_key)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        _fail(exc)


@portfolio_app.command("show")
def portfolio_show(directory: Path = typer.Argument(..., help="Portfolio directory.")) -> None:
    """Print a portfolio's table (and verify its files)."""
    from dnnshifter_lightning.shrink.build import portfolio_show_command

    try:
        portfolio_show_command(directory)
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)


@app.command()
def archive(
    portfolio: Path = typer.Argument(..., help="Portfolio directory."),
    model_name: str = typer.Option(..., "--model-name", help="TorchServe model name."),
    export_path: Path = typer.Option(..., "--export-path", help="Model store directory to write NAME.mar into."),
    config: Optional[Path] = typer.Option(None, "--config", help="A model-config.yaml to use instead of the defaults."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing NAME.mar."),
    variants: Optional[str] = typer.Option(None, "--variants", help="The served set: 'front' (default: the "
                                           "accuracy/latency front above the accuracy floor), 'all', or ID,ID,..."),
) -> None:
    """Package a portfolio, the handler and its config into STORE/NAME.mar with torch-model-archiver."""
    from dnnshifter_lightning.serve.torchserve import archive_command

    try:
        archive_command(portfolio, model_name, export_path, config=config, force=force, variants=variants)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        _fail(exc)


@app.command()
def serve(
    store: Optional[Path] = typer.Argument(None, help="Model store holding NAME.mar."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name (NAME of NAME.mar)."),
    no_auth: bool = typer.Option(False, "--no-auth", help="Disable token authorization (local demos only)."),
    enable_model_api: bool = typer.Option(
        False, "--enable-model-api",
        help="Let the management API register models (a .mar is code); only .mar files inside STORE."),
    stop: bool = typer.Option(False, "--stop", help="Stop the server started by `dnnshifter serve`."),
    inference_port: Optional[int] = typer.Option(None, help="Default: a free port on 127.0.0.1."),
    management_port: Optional[int] = typer.Option(None),
    metrics_port: Optional[int] = typer.Option(None),
) -> None:
    """Start real TorchServe on 127.0.0.1 with a generated config, wait until healthy, print the URLs."""
    from dnnshifter_lightning.serve.torchserve import serve_command, serve_stop_command

    try:
        if stop:
            serve_stop_command()
            return
        if store is None or model is None:
            raise ValueError("give the model store and --model NAME (or --stop)")
        serve_command(store, model, inference_port=inference_port, management_port=management_port,
                      metrics_port=metrics_port, no_auth=no_auth, enable_model_api=enable_model_api)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        _fail(exc)


@app.command("litserve")
def litserve_cmd(
    portfolio: Path = typer.Argument(..., help="Portfolio directory."),
    host: str = typer.Option("127.0.0.1", "--host", help="127.0.0.1 (loopback), or 0.0.0.0 / :: (every "
                             "interface; needs --api-key)."),
    port: int = typer.Option(8000, "--port"),
    workers_per_device: int = typer.Option(1, "--workers-per-device", help="Inference workers per device; "
                                           "each holds its own runtime and policy."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="The key clients send as X-API-Key "
                                          "(default: a generated one, written to a 0600 file)."),
    no_auth: bool = typer.Option(False, "--no-auth", help="No API key (127.0.0.1 only)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML with the handler's options (policy, slo_ms, "
                                          "fixed_variant, memory_budget_mb, min_accuracy, variants, ...)."),
    events_log: Optional[Path] = typer.Option(None, "--events-log", help="Append each worker's setup and every "
                                              "switch (time, from, to, reason, switch time) to this file as JSON lines."),
) -> None:
    """Serve a portfolio with LitServe (pure Python, no Java) until Ctrl-C: 127.0.0.1 and an API key by default."""
    from dnnshifter_lightning.serve.litserve_command import litserve_command

    try:
        litserve_command(portfolio, host=host, port=port, workers_per_device=workers_per_device, api_key=api_key,
                         no_auth=no_auth, config=config, events_log=events_log, console=console)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        _fail(exc)


if __name__ == "__main__":  # pragma: no cover
    app()
