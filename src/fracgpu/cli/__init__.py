"""The ``fracgpu`` command line: a thin layer over the library.

Commands only parse options, call ``fracgpu`` modules and print; every rule
(units, ranges, environment variables) lives in the library, so the CLI and
the Python API cannot disagree. This package is the only code that imports
click or rich, and nothing outside it imports it: one module per command
(``COMMANDS``, loaded when used), and ``common`` for the parameter types, the
errors and the console.
"""

from __future__ import annotations

import importlib
from typing import Any

import click


class LazyGroup(click.Group):
    """A group whose commands are imported when used, so ``fracgpu --help`` and
    each command load only what they need. Commands are ``"module:attribute"``."""

    def __init__(self, *args: Any, lazy_commands: dict[str, str] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy_commands:
            module, _, attribute = self.lazy_commands[name].partition(":")
            return getattr(importlib.import_module(module), attribute)
        return super().get_command(ctx, name)


# One row per top-level command; a new command is a module and a row here.
COMMANDS = {
    "cdi": "fracgpu.cli.cdi:cdi_group",
    "check": "fracgpu.cli.check:check",
    "demo": "fracgpu.cli.demo:demo",
    "device-plugin": "fracgpu.cli.device_plugin:device_plugin_command",
    "exporter": "fracgpu.cli.exporter:exporter",
    "gpus": "fracgpu.cli.gpus:gpus",
    "kubelet-plugin": "fracgpu.cli.kubelet_plugin:kubelet_plugin",
    "node": "fracgpu.cli.node:node_command",
    "partition": "fracgpu.cli.partition:partition_group",
    "report": "fracgpu.cli.report:report",
    "run": "fracgpu.cli.run:run",
    "slurm-prolog": "fracgpu.cli.slurm:slurm_prolog",
    "sim": "fracgpu.cli.sim:sim_group",
    "top": "fracgpu.cli.top:top",
}


@click.group(cls=LazyGroup, lazy_commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(None, "--version", package_name="fracgpu", prog_name="fracgpu")   # looked up when asked
@click.pass_context
def main(ctx: click.Context) -> None:
    """Share one NVIDIA GPU between jobs: memory quotas, compute shares, accounting."""
    from fracgpu import config, devices
    from fracgpu.cli.common import REFUSED, CommandRunner, InputError, probe_status

    devices.probe_progress = probe_status   # a spinner on stderr while a command asks the driver
    try:   # every command reads the node's books: a broken node file is refused once, here
        config.read()
    except config.ConfigError as e:
        error = InputError(str(e))
        if isinstance(main.get_command(ctx, ctx.invoked_subcommand or ""), CommandRunner):
            error.exit_code = REFUSED   # refused before its command starts
        raise error from None
