"""``pomt clocks status|lock|restore``: a device's clocks, by its preset's commands.

The presets and the clock control (torch, pydantic) are imported when a command runs, not
when ``--help`` is read.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated

import typer
from rich.text import Text

from pomt_cli.cli.options import preset_path, presets_text
from pomt_cli.console import plain_console
from pomt_cli.errors import PomtError

if TYPE_CHECKING:
    from pomt_cli.devices.clocks import ClockController
    from pomt_cli.devices.presets import DevicePreset

out = plain_console()

clocks_app = typer.Typer(
    name="clocks",
    help="Show, lock or restore a device's clocks with the commands of its preset (configs/devices/*.toml).",
    no_args_is_help=True,
)

#: Characters of a status command's output that ``pomt clocks status`` prints (rich takes seconds per 100 kB).
SHOWN_CHARS = 16000

PresetOption = Annotated[str, typer.Option("--device", callback=preset_path, help=f"Device preset ({presets_text()}) or a preset .toml file.")]
GpuOption = Annotated[str | None, typer.Option(
    "--torch-device", help="The torch device whose GPU is meant, e.g. cuda:1 for that GPU's nvidia-smi "
    "(default: the preset's).")]


def register(app: typer.Typer) -> None:
    app.add_typer(clocks_app, name="clocks", short_help="Show, lock or restore a device's clocks.")


def _heading(preset: DevicePreset) -> Text:
    """The preset's display name in bold, its name and description (all printed as written)."""
    return Text.assemble((preset.display_name, "bold"), f" ({preset.name}): {preset.description}")


def _controller(device: str, torch_device: str | None) -> tuple[DevicePreset, ClockController]:
    from pomt_cli.devices.clocks import ClockController
    from pomt_cli.devices.presets import load_preset

    preset = load_preset(device)
    # These commands measure nothing: their errors do not offer --no-lock-clocks.
    return preset, ClockController(preset, torch_device or preset.torch_device, measuring=False)


@clocks_app.command("status", short_help="Show the clocks as they are now (read-only).")
def status(
    device: PresetOption,
    torch_device: GpuOption = None,
) -> None:
    """Show the clocks' current state (runs the preset's read-only status commands)."""
    preset, ctl = _controller(device, torch_device)
    out.print(_heading(preset))
    why = ctl.available()
    if why:
        out.print(f"clocks cannot be controlled here: {why}")
        return
    saved = ctl.saved_state()
    if saved is not None:
        out.print(f"locked by pomt at {saved.locked_at}; saved state in {ctl.state_file}; "
                  f"restore with `pomt clocks restore --device {preset.device_arg}`")
    else:
        out.print("not locked by pomt")
    missing = ctl.missing_tools(("status",))
    if missing:
        raise PomtError(f"reading the clocks of {preset.name} needs {', '.join(missing)}, not found on PATH: "
                        f"is this a {preset.display_name}?")
    for result in ctl.status():
        out.print(Text(f"$ {result.shell}", style="dim"))
        shown = result.output[:SHOWN_CHARS]
        if len(result.output) > len(shown):
            shown += f"\n(... {len(result.output) - len(shown)} more characters: run it by hand to see them)"
        out.print(shown)
        if result.returncode:
            out.print(f"(exit {result.returncode})")


@clocks_app.command("lock", short_help="Lock the clocks until `pomt clocks restore`.")
def lock(
    device: PresetOption,
    torch_device: GpuOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the commands and what they need; run "
                                          "nothing.")] = False,
) -> None:
    """Lock the clocks (saving their state first) until `pomt clocks restore`."""
    from pomt_cli.devices.clocks import clock_lock

    preset, ctl = _controller(device, torch_device)
    if dry_run:
        plan = ctl.plan()
        out.print(_heading(preset))
        for phase, heading in (("read", "read first (saved to {})".format(ctl.state_file)), ("lock", "then lock"),
                               ("restore", "`pomt clocks restore` runs"), ("status", "status")):
            out.print(f"{heading}:")
            for line in plan[phase]:
                out.print(f"  {line}")
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
    with clock_lock(ctl):
        values = ctl.lock()
    shown = ", ".join(f"{k}={v}" for k, v in values.items())
    out.print(f"locked the clocks of {preset.display_name}" + (f" (saved {shown})" if shown else "")
              + f"; restore with `pomt clocks restore --device {preset.device_arg}`")


@clocks_app.command("restore")
def restore(
    device: PresetOption,
    torch_device: GpuOption = None,
) -> None:
    """Put the clocks back as they were before `pomt clocks lock`."""
    from pomt_cli.devices.clocks import clock_lock

    preset, ctl = _controller(device, torch_device)
    why = ctl.available()
    if why:
        raise PomtError(f"cannot restore the clocks of {preset.name}: {why}")
    with clock_lock(ctl):
        ctl.restore()
    out.print(f"restored the clocks of {preset.display_name}")
