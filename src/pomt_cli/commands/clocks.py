"""``pomt clocks status|lock|restore``: a device's clocks, by its preset's commands."""

from __future__ import annotations

import os

import typer
from rich.console import Console

from pomt_cli.devices import ClockController, DevicePreset, load_preset
from pomt_cli.errors import PomtError

out = Console(highlight=False)

clocks_app = typer.Typer(
    name="clocks",
    help="Show, lock or restore a device's clocks with the commands of its preset (configs/devices/*.toml).",
    no_args_is_help=True,
)

DEVICE_HELP = "Device preset (orin, tx2, xavier, nvidia, a100, h100, cpu) or a preset .toml file."
TORCH_DEVICE_HELP = "The torch device whose GPU is meant (cuda:1 -> that GPU for nvidia-smi) (default: the preset's)."


def register(app: typer.Typer) -> None:
    app.add_typer(clocks_app, name="clocks")


def _controller(device: str, torch_device: str | None) -> tuple[DevicePreset, ClockController]:
    preset = load_preset(device)
    return preset, ClockController(preset, torch_device or preset.torch_device)


@clocks_app.command("status")
def status(
    device: str = typer.Option(..., "--device", help=DEVICE_HELP),
    torch_device: str | None = typer.Option(None, "--torch-device", help=TORCH_DEVICE_HELP),
) -> None:
    """Show the clocks' current state (runs the preset's read-only status commands)."""
    preset, ctl = _controller(device, torch_device)
    out.print(f"[bold]{preset.display_name}[/] ({preset.name}): {preset.description}")
    why = ctl.available()
    if why:
        out.print(f"clocks cannot be controlled here: {why}")
        return
    saved = ctl.saved_state()
    if saved is not None:
        out.print(f"locked by pomt at {saved.get('locked_at', '?')}; saved state in {ctl.state_file}; "
                  f"restore with `pomt clocks restore --device {preset.name}`")
    else:
        out.print("not locked by pomt")
    missing = ctl.missing_tools(("status",))
    if missing:
        raise PomtError(f"reading the clocks of {preset.name} needs {', '.join(missing)}, not found on PATH: "
                        f"is this a {preset.display_name}?")
    for result in ctl.status():
        out.print(f"[dim]$ {result.shell}[/]", markup=True)
        out.print(result.output, markup=False)
        if result.returncode:
            out.print(f"(exit {result.returncode})")


@clocks_app.command("lock")
def lock(
    device: str = typer.Option(..., "--device", help=DEVICE_HELP),
    torch_device: str | None = typer.Option(None, "--torch-device", help=TORCH_DEVICE_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the commands and what they need; run nothing."),
) -> None:
    """Lock the clocks (saving their state first) until `pomt clocks restore`."""
    preset, ctl = _controller(device, torch_device)
    if dry_run:
        plan = ctl.plan()
        out.print(f"[bold]{preset.display_name}[/] ({preset.name}): {preset.description}")
        for phase, heading in (("read", "read first (saved to {})".format(ctl.state_file)), ("lock", "then lock"),
                               ("restore", "`pomt clocks restore` runs"), ("status", "status")):
            out.print(f"{heading}:")
            for line in plan[phase]:
                out.print(f"  {line}", markup=False)
        notes = []
        why = ctl.available()
        if why:
            notes.append(f"cannot lock here: {why}")
        missing = ctl.missing_tools()
        if missing:
            notes.append(f"not on PATH here: {', '.join(missing)}")
        if preset.clocks.needs_root and os.geteuid() != 0:
            notes.append("needs root: run with sudo")
        if ctl.saved_state() is not None:
            notes.append(f"already locked by pomt (state in {ctl.state_file})")
        out.print("dry run: nothing was run" + ("; " + "; ".join(notes) if notes else ""))
        return
    values = ctl.lock()
    shown = ", ".join(f"{k}={v}" for k, v in values.items())
    out.print(f"locked the clocks of {preset.display_name}" + (f" (saved {shown})" if shown else "")
              + f"; restore with `pomt clocks restore --device {preset.name}`")


@clocks_app.command("restore")
def restore(
    device: str = typer.Option(..., "--device", help=DEVICE_HELP),
    torch_device: str | None = typer.Option(None, "--torch-device", help=TORCH_DEVICE_HELP),
) -> None:
    """Put the clocks back as they were before `pomt clocks lock`."""
    preset, ctl = _controller(device, torch_device)
    why = ctl.available()
    if why:
        raise PomtError(f"cannot restore the clocks of {preset.name}: {why}")
    ctl.restore()
    out.print(f"restored the clocks of {preset.display_name}")
