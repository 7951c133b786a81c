"""The ``dnnshifter`` command (typer): every command and all of their console output.

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

import importlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from dnnshifter_lightning.demo.run import DEMO_DEFAULTS
from dnnshifter_lightning.serve.defaults import ENGINES

app = typer.Typer(
    name="dnnshifter",
    help="DNNShifter for Lightning and TorchServe: IMP -> exact structural pruning -> a served, switching portfolio.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
portfolio_app = typer.Typer(help="Build or inspect a portfolio of structurally pruned variants.", no_args_is_help=True)
app.add_typer(portfolio_app, name="portfolio")
console = Console()
_STDOUT = console  # the default of the commands' and DemoPrinter's ``console`` argument


def _exit(out: Console, exc: Exception) -> SystemExit:
    """Print ``exc`` as an error on ``out``; the caller raises the returned ``SystemExit(1)``."""
    out.print(f"[bold red]error:[/] {exc}", highlight=False)
    return SystemExit(1)


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
        with DemoPrinter(console) as printer:
            run_demo(out, levels=levels, prune_fraction=prune_fraction, epochs_per_level=epochs_per_level,
                     rewind_to=rewind_to, width=width, seed=seed, serve=serve, fresh=fresh, engine=engine,
                     report=printer)
    except (ValueError, FileExistsError, ServingError) as exc:
        raise _exit(console, exc) from exc


# ------------------------------------------------------------------------------------- demo output

def _fmt(v: Any) -> str:
    return "-" if v is None else str(v)


def _mb(n: Any) -> str:
    return "-" if not isinstance(n, (int, float)) else f"{n / 2**20:.2f} MB"


#: The spinner's text for each step of the demo's serving trace, from its ``phase_start`` info.
_PHASE_TEXT = {
    "capacity": "measuring the capacity of {variant}: {clients} clients for {seconds:g} s",
    "settle": "settling: light load until the most accurate variant serves",
    "light": "light: {rate:.0f} req/s for {seconds:g} s",
    "burst": "burst: {rate:.0f} req/s ({factor:g}x capacity) for {seconds:g} s",
    "recovery": "recovery: {rate:.0f} req/s until the most accurate variant serves again",
}


class DemoPrinter:
    """What ``dnnshifter demo`` prints: a ``report(event, info)`` for
    :func:`~dnnshifter_lightning.demo.run.run_demo` and
    :func:`~dnnshifter_lightning.demo.serving.run_demo_serving`.

    A step of the serving trace shows as a spinner between its ``phase_start`` and ``phase_end``;
    :meth:`close` stops one left running (the ``with`` block does it).

    Args:
        console: where it prints (default: the command's console).
    """

    def __init__(self, console: Console | None = None) -> None:
        self.console = console if console is not None else _STDOUT
        self._status: Any = None

    def __enter__(self) -> DemoPrinter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        show = getattr(self, f"_on_{event}", None)
        if show is not None:
            show(info)

    # the pipeline (demo/run.py)
    def _on_imp(self, i: dict[str, Any]) -> None:
        self.console.rule("[bold]1. Iterative Magnitude Pruning with rewinding on real 8x8 digits")
        self.console.print(f"DigitsCNN(width={i['width']}), {i['macs'] / 1e6:.1f} M MACs per sample dense; "
                           f"{i['levels']} levels x {i['epochs_per_level']} epochs at {i['prune_fraction']:.0%} per "
                           f"level (final sparsity {i['final_sparsity']:.2%}), rewind to {i['rewind_to']}")

    def _on_portfolio(self, i: dict[str, Any]) -> None:
        self.console.print(f"Portfolio: {i['path']} (manifest.json, variants, portfolio.png)")

    def _on_ladder(self, i: dict[str, Any]) -> None:
        ladder = i["report"]
        self.console.rule("[bold]2. The ladder: the front of validation accuracy against batch-8 latency")
        for line in ladder.lines():
            self.console.print(f"[yellow]{line}[/]" if line.startswith("NOT MET") else line, highlight=False)
        self.console.print("[green]ladder criteria met[/]" if ladder.ok else
                           "[yellow]this portfolio is not a ladder worth switching along (see NOT MET above)[/]")

    def _on_serving(self, i: dict[str, Any]) -> None:
        self.console.rule(f"[bold]3. Serving the portfolio with {ENGINES[i['engine']]}, switching as load changes")
        self.console.print(f"engine: {i['why']}", highlight=False)

    def _on_done(self, i: dict[str, Any]) -> None:
        self.console.print(f"Done in {i['seconds']:.0f} s. Summary: {i['summary']}")

    # the serving step (demo/serving.py)
    def _on_skipped(self, i: dict[str, Any]) -> None:
        self.console.print(f"[yellow]skipping the TorchServe part of the demo:[/] {i['reason']}")

    def _on_requests(self, i: dict[str, Any]) -> None:
        self.console.print(f"{i['count']} held-out digits as requests")

    def _on_engine(self, i: dict[str, Any]) -> None:
        if i["engine"] == "torchserve":
            self.console.print(f"[bold]serving {i['serving']} with TorchServe[/] (127.0.0.1)")
            off = "token auth is OFF for this demo[/] (127.0.0.1 only; `dnnshifter serve` keeps it on)"
        else:
            self.console.print(f"[bold]serving {i['serving']} with LitServe[/] (127.0.0.1:{i['port']}, one worker)")
            off = "API key is OFF for this demo[/] (127.0.0.1 only; `dnnshifter litserve` keeps it on)"
        if i["no_auth"]:
            self.console.print(f"[yellow]{off}")

    def _on_phase_start(self, i: dict[str, Any]) -> None:
        self.close()
        self._status = self.console.status(_PHASE_TEXT.get(i["phase"], "{phase}").format(**i))
        self._status.start()

    def _on_phase_end(self, i: dict[str, Any]) -> None:
        self.close()

    def _on_result(self, r: dict[str, Any]) -> None:
        from rich.table import Table

        out, served, front, top = self.console, r["served"], r["front"], r["most_accurate"]
        out.print(f"served set ({served['selection']}): {', '.join(front)}"
                  + (f"; dominated, not loaded: {', '.join(served['dominated'])}" if served["dominated"] else "")
                  + (f"; below the accuracy floor {served['floor']:.1%}: {', '.join(served['below_floor'])}"
                     if served["below_floor"] else "")
                  + (f" (accuracy floor {served['floor']:.1%}, {served['floor_rule']})"
                     if served["floor"] is not None else ""))
        for warning in served["warnings"]:
            out.print(f"[yellow]warning:[/] {warning}")
        memory = r["memory"]
        if memory:
            out.print(f"memory for model weights: {_mb(memory.get('total_bytes'))} resident for the {len(front)} "
                      f"served variants (all compressed + the active one inflated) against "
                      f"{_mb(memory.get('served_all_inflated_bytes'))} with all of them inflated")
        out.print(f"capacity of {top}: {r['capacity_rps']:.0f} req/s (closed loop, 16 clients); light load "
                  f"{r['light_rate']:.0f} req/s, burst {r['burst_rate']:.0f} req/s")
        switches, fixed = r["switches"], r["fixed_variant"]
        if switches:
            table = Table(title=f"variant switches seen by the {r['switch_source']}")
            for col in ("at (s)", "", "from", "to", "why", "switch (ms)"):
                table.add_column(col)
            for s in switches:
                table.add_row(f"{s['at_s']:.2f}", s["direction"], s["from"], s["to"], s["reason"],
                              f"{s['switch_ms']:.2f}")
            out.print(table)
        elif fixed:
            out.print(f"[yellow]no switch: {r['fixed_by']['config']} fixes the variant to {fixed} "
                      f"({r['fixed_by']['key']})[/]")
        elif len(front) == 1:
            out.print(f"[yellow]no switch: {front[0]} is the only served variant (the accuracy/latency front above "
                      f"the accuracy floor has one variant: it is both the most accurate and the cheapest), so the "
                      f"policy has nothing to switch to[/]")
        else:
            out.print(f"[yellow]no switch happened: the burst did not saturate the worker on {top}[/]")
        table = Table(title=f"serving per phase (latency from when each request was due; deadline "
                            f"{r['deadline_ms']:g} ms)")
        for col in ("phase", "requests", "errors", "p50 ms", "p90 ms", "p99 ms", "req/s", "accuracy", "effective acc.",
                    "served by"):
            table.add_column(col, justify="right" if col not in ("phase", "served by") else "left")
        for name, p in r["phases"].items():
            mix = ", ".join(f"{k}: {v}" for k, v in sorted(p["variants"].items()))
            table.add_row(name, str(p["requests"]), str(p["errors"]), _fmt(p["p50_ms"]), _fmt(p["p90_ms"]),
                          _fmt(p["p99_ms"]), _fmt(p["throughput_rps"]),
                          "-" if p["accuracy"] is None else f"{p['accuracy']:.1%}",
                          "-" if p["effective_accuracy"] is None else f"{p['effective_accuracy']:.1%}", mix)
        out.print(table)
        if r["effective_accuracy"] is not None:
            out.print(f"effective accuracy of the run: {r['effective_accuracy']:.1%} of {r['requests']} requests "
                      f"answered correctly within {r['deadline_ms']:g} ms of when they were due")


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
    try:
        portfolio_build_command(ckpt_dir, model, out, datamodule, input_shape=input_shape, input_key=input_key,
                                target_key=target_key)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        raise _exit(console, exc) from exc


@portfolio_app.command("show")
def portfolio_show(directory: Path = typer.Argument(..., help="Portfolio directory.")) -> None:
    """Print a portfolio's table (and verify its files)."""
    try:
        portfolio_show_command(directory)
    except (ValueError, FileNotFoundError) as exc:
        raise _exit(console, exc) from exc


# ------------------------------------------------------------------------------ portfolio commands
# Plain functions behind `dnnshifter portfolio build|show`; they print the progress and the table.

def import_object(spec: str) -> Any:
    """``"package.module:Name"`` (dotted attributes too, ``module:Class.method``) -> the object.

    Raises:
        ValueError: ``spec`` is not ``package.module:Name``.
        ImportError, AttributeError: the module or the name does not exist.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'package.module:Class', got {spec!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def parse_input_shape(text: str) -> list[int]:
    """``"3,32,32"`` -> ``[3, 32, 32]`` (the CLI's ``--input-shape``, without the batch dimension).

    Raises:
        ValueError: anything but comma-separated positive ints.
    """
    try:
        shape = [int(part) for part in text.split(",")]
    except ValueError:
        shape = []
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"--input-shape must be comma-separated positive ints without the batch dimension, "
                         f"e.g. 3,32,32; got {text!r}")
    return shape


def portfolio_build_command(ckpt_dir: Path, model: str, out: Path, datamodule: str | None = None,
                            input_shape: str | None = None, input_key: str | None = None,
                            target_key: str | None = None) -> dict[str, Any]:
    """``dnnshifter portfolio build CKPT_DIR --model pkg.mod:Class --out DIR [--datamodule pkg.mod:Class]
    [--input-shape C,H,W] [--input-key K --target-key K]``: returns the manifest written.

    The model class is loaded with ``load_from_checkpoint`` (from the checkpoint's hparams). The
    validation data comes from ``--datamodule`` or the model's own ``val_dataloader``. The input
    shape comes from ``--input-shape``, else an ``input_spec`` attribute (of the loaded model or
    the DataModule), else the loaded model's ``example_input_array``, else the validation batches.

    Raises:
        FileNotFoundError: no level checkpoints in ``ckpt_dir``.
        ValueError: a bad ``--model``/``--input-shape``, or no input shape (the message names the ways).
    """
    import lightning as L
    from lightning.pytorch.utilities.model_helpers import is_overridden

    from dnnshifter_lightning.shrink.build import build_portfolio, level_checkpoints, resolve_input
    from dnnshifter_lightning.shrink.callback import first_loader
    from dnnshifter_lightning.shrink.measure import batch_unpacker
    from dnnshifter_lightning.shrink.report import BuildProgress, build_console, portfolio_table
    from dnnshifter_lightning.train.checkpoints import module_loader

    module_cls = import_object(model)
    paths = level_checkpoints(ckpt_dir)
    unpack = batch_unpacker(input_key, target_key)
    # Built from the checkpoint's hparams, so attributes set in __init__ (example_input_array) are seen.
    first = module_loader(module_cls)(paths[0])
    dm = import_object(datamodule)() if datamodule else None
    loader = None
    if dm is not None:
        dm.prepare_data()
        dm.setup("validate")
        loader = first_loader(dm.val_dataloader())
    elif is_overridden("val_dataloader", first, parent=L.LightningModule):
        loader = first_loader(first.val_dataloader())
    else:
        warnings.warn(f"{model} defines no val_dataloader and no --datamodule was given: accuracies will be null",
                      stacklevel=2)
    spec = dict(getattr(first, "input_spec", None) or getattr(dm, "input_spec", None) or {})
    if input_shape is not None:
        spec["shape"] = parse_input_shape(input_shape)
    try:
        example_input = getattr(first, "example_input_array", None)
    except Exception:  # noqa: BLE001 - a property that needs a trainer
        example_input = None
    try:
        resolve_input(spec, example_input, loader, unpack=unpack, n=1)
    except ValueError as exc:
        if "no input shape" in str(exc):
            raise ValueError(f"no input shape for {model}: give --input-shape C,H,W, set example_input_array on "
                             f"{model} (e.g. torch.zeros(1, C, H, W) in __init__), or give --datamodule "
                             f"(its validation batches give the shape)") from exc
        raise
    out_console = build_console()
    with BuildProgress(out_console) as progress:
        manifest = build_portfolio(paths, module_cls, out, loader, spec, example_input_array=example_input,
                                   unpack=unpack, progress=progress)
    out_console.print(portfolio_table(manifest, title=f"portfolio {Path(out)}"))
    return manifest


def portfolio_show_command(dir: Path) -> dict[str, Any]:  # noqa: A002 - the CLI argument's name
    """``dnnshifter portfolio show DIR``: verify every file's sha256 and print the table; returns the manifest.

    Raises:
        PortfolioError: a file that does not match the manifest, or an invalid manifest.
    """
    from dnnshifter_lightning.portfolio import MANIFEST_NAME, verify_portfolio
    from dnnshifter_lightning.shrink.report import build_console, portfolio_table

    manifest = verify_portfolio(dir)
    out_console = build_console()  # pipes and logs get the full table
    out_console.print(portfolio_table(manifest, title=f"portfolio {dir} ({len(manifest['variants'])} variants, sha256 ok)"))
    spec = manifest["input_spec"]
    out_console.print(f"input: shape {spec['shape']} {spec['dtype']}; built {manifest.get('created', '?')} "
                      f"on {manifest.get('build', {}).get('platform', '?')}; manifest {Path(dir) / MANIFEST_NAME}")
    return manifest


# -------------------------------------------------------------------------------- TorchServe commands
# Plain functions behind `dnnshifter archive` and `dnnshifter serve [--stop]`, with the console passed in
# (tests record it). On failure each prints the error and raises SystemExit(1).

from dnnshifter_lightning.serve.defaults import state_dir  # noqa: E402  (the servers' state, shared)


def archive_command(portfolio: Path, model_name: str, export_path: Path, config: Path | None = None,
                    force: bool = False, console: Console | None = None, variants: str | None = None) -> Path:
    """``dnnshifter archive``: build ``STORE/NAME.mar``, print where it went and how to serve it."""
    from dnnshifter_lightning.serve.torchserve import ServingError, build_archive

    out = console if console is not None else _STDOUT
    try:
        mar = build_archive(portfolio, model_name, export_path, config, force, variants=variants)
    except (ServingError, OSError, ValueError) as exc:
        raise _exit(out, exc) from exc
    out.print(f"wrote [bold]{mar}[/] ({mar.stat().st_size / 1e6:.1f} MB)\n"
              f"serve it:  dnnshifter serve {export_path} --model {model_name}")
    return mar


def _read_state(state_file: Path) -> dict[str, Any] | None:
    from dnnshifter_lightning.serve.torchserve import ServingError, TorchServeServer

    try:
        state = json.loads(state_file.read_text())
        TorchServeServer.attach(state)  # has every field attach needs
    except (OSError, ValueError, KeyError, TypeError, ServingError):
        return None
    return state if isinstance(state, dict) else None


def serve_command(store: Path, model: str, *, inference_port: int | None = None, management_port: int | None = None,
                  metrics_port: int | None = None, no_auth: bool = False, enable_model_api: bool = False,
                  console: Console | None = None) -> dict[str, Any]:
    """``dnnshifter serve STORE --model NAME``: start TorchServe on 127.0.0.1 in the background, wait until
    it is healthy, record it in ``state_dir()/serve.json`` for ``--stop``, print the URLs and keys.

    Ports default to TorchServe's 8080/8081/8082 when free, else free ones. Token authorization
    stays on unless ``no_auth``; the management API registers models only with ``enable_model_api``
    (and then only ``.mar`` files in ``store``)."""
    from dnnshifter_lightning.serve.torchserve import ServingError, TorchServeServer, free_port, port_is_free

    out = console if console is not None else _STDOUT
    home = state_dir()
    state_file = home / "serve.json"
    if state_file.is_file():
        state = _read_state(state_file)
        if state is not None:
            old = TorchServeServer.attach(state)
            if old.verify_ours(state) is None:
                raise _exit(out, ServingError(f"a server is already running ({old.inference_url}); "
                                              "stop it first: dnnshifter serve --stop"))
        state_file.unlink()
    mar = Path(store) / f"{model}.mar"
    if not mar.is_file():
        raise _exit(out, ServingError(f"{mar} not found; build it with: dnnshifter archive PORTFOLIO "
                                      f"--model-name {model} --export-path {store}"))
    wanted = {"inference": inference_port, "management": management_port, "metrics": metrics_port}
    ports = {k: v or (d if port_is_free(d) else free_port()) for (k, v), d in zip(wanted.items(), (8080, 8081, 8082))}
    workdir = home / "torchserve"
    shutil.rmtree(workdir / "logs", ignore_errors=True)
    server = TorchServeServer(store, {model: mar.name}, no_auth=no_auth, enable_model_api=enable_model_api,
                              workdir=workdir, ports=ports)
    with out.status(f"starting TorchServe for {model} (loading and profiling the portfolio)..."):
        try:
            server.start()
        except ServingError as exc:
            raise _exit(out, exc) from exc
    home.mkdir(parents=True, exist_ok=True)
    from dnnshifter_lightning._atomic import atomic_write
    atomic_write(state_file, json.dumps(server.state(), indent=2))  # --stop never reads half a state file
    out.print(f"[bold green]TorchServe is serving {model}[/]\n"
              f"  inference   {server.inference_url}/predictions/{model}\n"
              f"  management  {server.management_url}/models/{model}\n"
              f"  metrics     {server.metrics_url}/metrics\n"
              f"  logs        {server.log_dir}")
    auth = "" if no_auth else f' -H "Authorization: Bearer $(jq -r .inference.key {server.key_file})"'
    if no_auth:
        out.print("  [yellow]token auth is OFF (--no-auth):[/] any local user can call every API")
    if enable_model_api:
        out.print(f"  [yellow]the management API can register models[/] (only .mar files in {server.store})")
    if not no_auth:
        out.print(f"  token auth is ON: keys are in {server.key_file} (inference.key for predictions, "
                  "management.key for the management API; they expire after 60 min, the API key there "
                  f"mints new ones: POST {server.management_url}/token?type=inference)")
    out.print(f"try:  curl{auth} -X POST {server.inference_url}/predictions/{model} -T digit.png\n"
              f"      curl{auth} -H 'Content-Type: application/json' -d '{{\"data\": [[...]]}}' "
              f"{server.inference_url}/predictions/{model}\n"
              "stop it with:  dnnshifter serve --stop")
    return {"model": model, **server.state(), "inference_url": server.inference_url,
            "management_url": server.management_url, "metrics_url": server.metrics_url,
            "key_file": None if no_auth else str(server.key_file)}


def serve_stop_command(console: Console | None = None) -> bool:
    """``dnnshifter serve --stop``: stop the server ``dnnshifter serve`` started. True if one was running.

    Only a process verified as that TorchServe (:meth:`TorchServeServer.verify_ours`: same pid,
    start time, command line and process group) is signalled. A stale or foreign state file is
    removed with a message, and nothing is signalled."""
    from dnnshifter_lightning.serve.torchserve import TorchServeServer

    out = console if console is not None else _STDOUT
    state_file = state_dir() / "serve.json"
    if not state_file.is_file():
        out.print("no server started by `dnnshifter serve` is running")
        return False
    state = _read_state(state_file)
    if state is None:
        state_file.unlink(missing_ok=True)
        out.print(f"{state_file} was unreadable; removed it, signalled nothing")
        return False
    server = TorchServeServer.attach(state)
    why_not = server.verify_ours(state)
    if why_not is not None:
        state_file.unlink(missing_ok=True)
        out.print(f"not stopping anything: {why_not}. Removed the stale {state_file}", highlight=False)
        return False
    server.stop()
    state_file.unlink(missing_ok=True)
    out.print("TorchServe stopped")
    return True



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
    try:
        archive_command(portfolio, model_name, export_path, config=config, force=force, variants=variants)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        raise _exit(console, exc) from exc


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
    try:
        if stop:
            serve_stop_command()
            return
        if store is None or model is None:
            raise ValueError("give the model store and --model NAME (or --stop)")
        serve_command(store, model, inference_port=inference_port, management_port=management_port,
                      metrics_port=metrics_port, no_auth=no_auth, enable_model_api=enable_model_api)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        raise _exit(console, exc) from exc


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
                         no_auth=no_auth, config=config, events_log=events_log, report=_print_litserve_event)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        raise _exit(console, exc) from exc


def _print_litserve_event(event: str, info: dict) -> None:
    """What `dnnshifter litserve` shows: where it starts, the URLs and the key once healthy, the stop."""
    if event == "starting":
        console.print(f"starting LitServe on {info['bind']}:{info['port']} (loading and profiling the portfolio "
                      "in each worker)...", highlight=False, soft_wrap=True)
    elif event == "serving":
        base, key_file = info["base"], info["key_file"]
        auth = f' -H "X-API-Key: $(cat {key_file})"' if key_file else (' -H "X-API-Key: $KEY"' if info["api_key"] else "")
        where = "every interface" if info["bind"] != "127.0.0.1" else "127.0.0.1 only"
        console.print(f"[bold green]LitServe is serving {info['portfolio']}[/] ({where}, "
                      f"{info['workers_per_device']} worker(s) per device)\n"
                      f"  predict  POST {base}/predict\n"
                      f"  health   {base}/health\n"
                      f"  metrics  {base}/metrics/   (Prometheus; not behind the API key, as TorchServe's)\n"
                      f"  info     {base}/info", highlight=False, soft_wrap=True)
        if key_file:
            console.print(f"  API key ON: generated, in {key_file} (mode 0600); send it as X-API-Key", highlight=False,
                          soft_wrap=True)
        elif info["api_key"]:
            console.print("  API key ON: the one given with --api-key; send it as X-API-Key")
        else:
            console.print("  [yellow]API key OFF (--no-auth):[/] any local user can call it")
        console.print(f"try:  curl{auth} -X POST {base}/predict --data-binary @digit.png\n"
                      "Ctrl-C stops it", highlight=False, soft_wrap=True)
    elif event == "stopped":
        console.print("LitServe stopped")


if __name__ == "__main__":  # pragma: no cover
    app()
