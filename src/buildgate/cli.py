"""The command line.  The only module that imports click, prints or exits.

Every error reaches ``main`` as a BuildgateError and leaves through one table,
``exit_code_for``, so the documented exit codes (docs/exit-codes.md) live in
exactly one place.

``buildgate run`` is on the hot path of every build, and importing click costs
more than the rest of buildgate together; so a plain ``run`` command line (the
options below, in their long or ``-E N`` forms) is parsed by ``_fast_run_args``
without click, and anything else - help, ``-E3``, a typo - goes to the click
app, which gives the same result or the proper usage error.
"""

from __future__ import annotations

import os
import sys

from buildgate import __version__
from buildgate.errors import (
    BuildgateError,
    CommandNotExecutable,
    CommandNotFound,
    ConfigError,
    InternalFailure,
    Interrupted,
    PermissionProblem,
    QueueTimeout,
    Unavailable,
    UsageError,
    WouldBlock,
)

TYPE_CHECKING = False  # typing's costs every build ~7 ms: see _records.py
if TYPE_CHECKING:
    from typing import NoReturn

EX_USAGE = 2
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78
EX_TIMEOUT = 124
EX_SOFTWARE = 125
EX_NOEXEC = 126
EX_NOTFOUND = 127

_CODES: list[tuple[type[BuildgateError], int]] = [
    (UsageError, EX_USAGE),
    (ConfigError, EX_CONFIG),
    (PermissionProblem, EX_NOPERM),
    (Unavailable, EX_UNAVAILABLE),
    (WouldBlock, EX_TEMPFAIL),
    (QueueTimeout, EX_TIMEOUT),
    (CommandNotFound, EX_NOTFOUND),
    (CommandNotExecutable, EX_NOEXEC),
    (InternalFailure, EX_SOFTWARE),
]


def exit_code_for(exc: BuildgateError, conflict_exit_code: int = EX_TIMEOUT) -> int:
    if isinstance(exc, Interrupted):
        return 128 + exc.signum
    if isinstance(exc, QueueTimeout):
        return conflict_exit_code
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return EX_SOFTWARE


def _say(text: str) -> None:
    _err(f"buildgate: {text}\n")


def _err(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


class _State:
    conflict_exit_code = EX_TIMEOUT


def _do_run(config_path: str | None, mem: str | None, wait: float | None, no_wait: bool, name: str | None,
            conflict_exit_code: int, keep_leftovers: bool, backend: str | None, quiet: bool,
            command: tuple[str, ...] | list[str]) -> NoReturn:
    _State.conflict_exit_code = conflict_exit_code
    if wait is not None and no_wait:
        raise UsageError("--wait and --no-wait contradict each other: give one of them")
    from buildgate.config import load_config
    from buildgate.runner import Hooks, RunRequest, summary
    from buildgate.runner import run as do_run

    cfg = load_config(config_path)
    tty = sys.stderr.isatty()
    shown = {"waited": False}

    def waiting(text: str) -> None:
        if quiet:
            return
        shown["waited"] = True
        line = "buildgate: " + text
        if tty:
            # one screen line, or the next \r would not overwrite all of it
            try:
                width = os.get_terminal_size(sys.stderr.fileno()).columns or 200
            except OSError:
                width = 200
            _err("\r\033[K" + line[: max(20, width - 1)])
        else:
            _err(line + "\n")

    def admitted(scope: str, waited: float) -> None:
        if shown["waited"] and tty:
            _err("\n")

    hooks = Hooks(waiting=waiting, refresh=1.0 if tty else 60.0, admitted=admitted,
                  warn=lambda text: _say(f"warning: {text}"))
    req = RunRequest(argv=list(command), mem=mem, wait=wait, no_wait=no_wait, name=name,
                     keep_leftovers=keep_leftovers, backend=backend)
    result = do_run(cfg, req, hooks)
    if not quiet or result.exit_code != 0:
        _say(summary(result))
    # The build is over, its ticket released and its scope's stop queued: all
    # that is left is the interpreter's own teardown (module and object
    # finalization, pystemd's included), ~15 ms that every deploy would wait
    # for. Nothing of ours needs it (no atexit handlers, no files to flush but
    # these two), so leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(result.exit_code)


_RUN_VALUES = {"--mem": "mem", "--wait": "wait", "--name": "name", "-E": "conflict_exit_code",
               "--conflict-exit-code": "conflict_exit_code", "--backend": "backend"}
_RUN_FLAGS = {"--no-wait": "no_wait", "--keep-leftovers": "keep_leftovers", "-q": "quiet", "--quiet": "quiet"}
_BACKENDS = ("auto", "systemd", "cgroupfs", "none")


def _fast_run_args(args: list[str]) -> dict | None:
    """``[--config P] run [OPTIONS] [--] COMMAND...`` without click, or None."""
    out: dict = {"config_path": None, "mem": None, "wait": None, "no_wait": False, "name": None,
                 "conflict_exit_code": EX_TIMEOUT, "keep_leftovers": False, "backend": None, "quiet": False}
    i = 0
    while i < len(args) and args[i].startswith("--config"):
        if args[i] == "--config" and i + 1 < len(args):
            out["config_path"], i = args[i + 1], i + 2
        elif args[i].startswith("--config="):
            out["config_path"], i = args[i][len("--config="):], i + 1
        else:
            return None
    if i >= len(args) or args[i] != "run":
        return None
    i += 1
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        key, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if key in _RUN_VALUES:
            if not eq:
                i += 1
                if i >= len(args):
                    return None
                value = args[i]
            out[_RUN_VALUES[key]] = value
        elif key in _RUN_FLAGS and not eq:
            out[_RUN_FLAGS[key]] = True
        else:
            return None  # help, unknown options, short clusters: click decides
        i += 1
    command = args[i:]
    if not command:
        return None
    try:
        if out["wait"] is not None:
            out["wait"] = float(out["wait"])
            if not out["wait"] >= 0:
                return None
        out["conflict_exit_code"] = int(out["conflict_exit_code"])
    except ValueError:
        return None
    if not 0 <= out["conflict_exit_code"] <= 255 or out["backend"] not in (None, *_BACKENDS):
        return None
    out["command"] = command
    return out


def _click_app():  # noqa: C901 - the click definitions, built only when needed
    import click

    @click.group(context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(__version__, prog_name="buildgate")
    @click.option("--config", "config_path", metavar="PATH", envvar="BUILDGATE_CONFIG",
                  help="Config file (default /etc/buildgate/buildgate.conf, or $BUILDGATE_CONFIG).")
    @click.pass_context
    def cli(ctx: click.Context, config_path: str | None) -> None:
        """Queue, reserve memory for and hard-cap builds on a shared host."""
        ctx.obj = config_path


    @cli.command(context_settings={"allow_interspersed_args": False})
    @click.option("--mem", metavar="SIZE",
                  help="Memory to reserve and cap the build at: 2.5G, 512M (base 1024) or 50% of "
                       "the budget.  Default: the whole budget (one build at a time).")
    @click.option("--wait", "wait", type=click.FloatRange(min=0), metavar="SECONDS",
                  help="Give up after waiting this long (default 900, or wait= in the config).")
    @click.option("--no-wait", is_flag=True, help="Start now or exit 75; never queue.")
    @click.option("--name", metavar="NAME", help="Label in status lines and the scope name (default: the command).")
    @click.option("-E", "--conflict-exit-code", type=click.IntRange(0, 255), default=EX_TIMEOUT,
                  show_default=True, help="Exit code when --wait runs out (as flock -E).")
    @click.option("--keep-leftovers", is_flag=True,
                  help="Do not stop the build's leftover processes when it exits; they keep its "
                       "reservation until they end.")
    @click.option("--backend", type=click.Choice(["auto", "systemd", "cgroupfs", "none"]), default=None,
                  help="How to cap the build (default: backend= in the config, auto: systemd if it is "
                       "init, else a writable memory cgroup, else none = UNCAPPED, with a warning).")
    @click.option("-q", "--quiet", is_flag=True, help="No status lines; the summary only when the build fails.")
    @click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
    @click.pass_obj
    def run(config_path: str | None, mem: str | None, wait: float | None, no_wait: bool, name: str | None,
            conflict_exit_code: int, keep_leftovers: bool, backend: str | None, quiet: bool,
            command: tuple[str, ...]) -> None:
        """Run COMMAND once there is room for it, capped at --mem, in build.slice.

        \b
        buildgate run --mem 2.5G -- npx astro build
        buildgate run --no-wait npm run build
        """
        _do_run(config_path, mem, wait, no_wait, name, conflict_exit_code, keep_leftovers, backend, quiet,
                command)


    @cli.command()
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @click.pass_obj
    def status(config_path: str | None, as_json: bool) -> None:
        """Show the queue: who runs, who waits, how much memory each reserved."""
        import json
        import time

        from buildgate.config import load_config
        from buildgate.queue import Queue, format_duration, prepare_state_dir
        from buildgate.sizes import format_size

        cfg = load_config(config_path)
        entries: list = []
        if os.path.isdir(os.path.join(cfg.state_dir, "q")):  # no queue yet: nothing ran
            if os.access(cfg.state_dir, os.W_OK):
                prepare_state_dir(cfg.state_dir)
            entries, _ = Queue(cfg.state_dir).snapshot()
        if as_json:
            click.echo(json.dumps([json.loads(e.to_json()) | {"orphan": e.orphan} for e in entries], indent=2))
            return
        if not entries:
            click.echo("queue empty")
            return
        now = time.time()
        for e in entries:
            since = e.t_admitted if e.holds_memory and e.t_admitted else e.t_enqueued
            pid = e.main_pid if e.orphan and e.main_pid else e.pid
            state = e.state + (" (buildgate gone)" if e.orphan else "")
            click.echo(f"#{e.seq} {state:<10} {format_size(e.mem):>6} {format_duration(now - since):>7}  "
                       f"{e.name} pid {pid}: {e.argv}")


    @cli.command()
    @click.option("--budget", metavar="SIZE", help="Memory for all builds together (build.slice MemoryMax).")
    @click.option("--reserve", metavar="SIZE", help="Memory to keep for the OS, sshd and services; budget = MemTotal - reserve.")
    @click.option("--group", default="buildgate", show_default=True, help="Group whose members may run builds without root.")
    @click.option("--dry-run", is_flag=True, help="Print every file and systemctl call instead of doing them.")
    @click.option("--root", default="/", show_default=True, metavar="DIR", help="Install into DIR instead of / (images, tests).")
    @click.option("--force", is_flag=True, help="Overwrite files that were edited by hand.")
    @click.option("--undo", is_flag=True, help="Remove what setup installed.")
    @click.pass_obj
    def setup(config_path: str | None, budget: str | None, reserve: str | None, group: str, dry_run: bool,
              root: str, force: bool, undo: bool) -> None:
        """Set the host up: build slice, sshd protection, config, state dir, non-root access."""
        from buildgate.setup import SetupOptions, run_setup

        if budget and reserve:
            raise UsageError("--budget and --reserve both size the budget: give one of them")
        report = run_setup(SetupOptions(budget=budget, reserve=reserve, group=group, dry_run=dry_run,
                                        root=root, force=force, undo=undo, config_path=config_path))
        for line in report.lines:
            click.echo(line)
        sys.exit(report.exit_code)


    @cli.command()
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @click.pass_obj
    def doctor(config_path: str | None, as_json: bool) -> None:
        """Check that this host is protected, and say how to fix what is not."""
        import json

        from buildgate.doctor import exit_code, run_checks

        checks = run_checks(config_path)
        if as_json:
            click.echo(json.dumps([c.as_dict() for c in checks], indent=2))
        else:
            for c in checks:
                click.echo(c.render())
        sys.exit(exit_code(checks))


    @cli.command(hidden=True)
    def helper() -> None:
        """The privileged helper (run by buildgate-helper@.service, connection on stdin)."""
        from buildgate.helper import serve

        sys.exit(serve(0))



    return cli


def main(argv: list[str] | None = None) -> NoReturn:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        fast = _fast_run_args(args)
        if fast is not None:
            _State.conflict_exit_code = fast["conflict_exit_code"]
            _do_run(**fast)
        _click_main(args)
    except BuildgateError as exc:
        _say(str(exc))
        sys.exit(exit_code_for(exc, _State.conflict_exit_code))
    except KeyboardInterrupt:
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # never a traceback in a deploy log
        if os.environ.get("BUILDGATE_DEBUG"):
            raise
        _say(f"internal error: {type(exc).__name__}: {exc} (rerun with BUILDGATE_DEBUG=1 and report it)")
        sys.exit(EX_SOFTWARE)
    sys.exit(0)


def _click_main(args: list[str]) -> None:
    import click

    try:
        _click_app().main(args=args, prog_name="buildgate", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        # One line, not click's usage block: deploy logs are read in a hurry.
        hint = ""
        ctx = getattr(exc, "ctx", None)
        if ctx is not None:
            hint = f" (see {ctx.command_path} --help)"
        _say(f"{exc.format_message()}{hint}")
        sys.exit(exc.exit_code if exc.exit_code else EX_USAGE)
    except click.exceptions.Abort:
        sys.exit(130)
