"""The ``peftserve`` command line.

``peftserve serve`` takes one flag per field of the config dataclasses (STYLE item 2): the
flag is the field name with dashes, its help is the field's docstring, list fields are
repeatable flags, and every flag has a ``PEFTSERVE_<FIELD>`` environment variable (lists
comma-separated). A flag beats its environment variable, which beats the field's default.

``peftserve adapters upload|list|show|delete|load|unload`` and ``peftserve rollout
start|status|pause|resume|promote|rollback|retry|history`` talk to a running server
through ``peftserve.client`` (``--server``, env ``PEFTSERVE_SERVER``; ``--token``, env
``PEFTSERVE_ADMIN_TOKEN``): readable tables, ``--json`` for scripts, the server's message
on stderr and exit status 1 when a call fails. Output cut short by the reader (``| head``)
is not a failure: the command still exits 0 when what it asked the server succeeded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from peftserve import __version__
from peftserve.server.settings import (
    FlagAlias,
    FlagSpec,
    ServeSettings,
    config_values,
    converter,
    default_of,
    flag_specs,
    settings_from_values,
)

EXIT_USAGE = 2
EXIT_STARTUP = 1


def add_config_flags(parser: argparse.ArgumentParser, specs: Sequence[FlagSpec]) -> None:
    """One flag per spec, grouped by config class; unset flags stay out of the namespace."""
    groups: dict[type, Any] = {}
    for spec in specs:
        if spec.owner not in groups:
            groups[spec.owner] = parser.add_argument_group(spec.owner.__name__)
        default = default_of(spec)
        shown = ",".join(map(str, default)) if spec.is_list else default
        help_text = f"{spec.help} (default: {shown!s}; env {spec.env})".replace("%", "%%")
        kwargs: dict[str, Any] = {
            "dest": spec.field,
            "default": argparse.SUPPRESS,
            "help": help_text,
        }
        if spec.kind is bool and not spec.is_list:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = converter(spec)
            kwargs["metavar"] = spec.field.upper()
            if spec.is_list:
                kwargs["action"] = "append"
        groups[spec.owner].add_argument(spec.flag, **kwargs)
        for alias in spec.aliases:
            groups[spec.owner].add_argument(alias.flag, **_alias_kwargs(spec, alias))


def _alias_kwargs(spec: FlagSpec, alias: FlagAlias) -> dict[str, Any]:
    """argparse options of ``alias``: it writes the field of ``spec`` (no env var of its own)."""
    help_text = f"{alias.origin}'s name for {spec.flag}"
    if alias.help:
        help_text += f" ({alias.help})"
    kwargs: dict[str, Any] = {
        "dest": spec.field,
        "default": argparse.SUPPRESS,
        "help": help_text.replace("%", "%%"),
    }
    kwargs["type"] = _with_message(alias.parse) if alias.parse else converter(spec)
    kwargs["metavar"] = alias.metavar or spec.field.upper()
    if alias.many:
        kwargs["nargs"] = "+"
        kwargs["action"] = "extend"
    elif spec.is_list:
        kwargs["action"] = "append"
    return kwargs


def _with_message(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` whose ValueError message argparse shows (it hides a plain ValueError's)."""

    def parse_or_explain(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse_or_explain


def add_vllm_flags(parser: argparse.ArgumentParser) -> None:
    """vLLM flags with no setting of ours to map onto, accepted so a vLLM command line runs."""
    group = parser.add_argument_group("vLLM compatibility")
    group.add_argument(
        "--enable-lora", action="store_true", dest="vllm_enable_lora",
        help="accepted for vLLM command lines; LoRA serving is always on here",
    )  # fmt: skip


def serve_settings(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ServeSettings:
    """Configs for ``serve`` from parsed flags and the environment; raises ValueError."""
    specs = flag_specs()
    values = config_values(args, specs, os.environ if environ is None else environ)
    return settings_from_values(values, specs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftserve", description="Serve one base LLM with many LoRA adapters."
    )
    parser.add_argument("--version", action="version", version=f"peftserve {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the OpenAI-compatible server",
        description="Run the OpenAI-compatible server. Every flag also reads PEFTSERVE_<FIELD> (e.g. PEFTSERVE_MAX_LORA_RANK); a flag beats its variable.",
    )
    add_config_flags(serve, flag_specs())
    add_vllm_flags(serve)
    serve.set_defaults(handler=_run_serve)
    add_adapters_parser(commands)
    add_rollout_parser(commands)
    # Listed here for --help; main() hands "peftserve demo ..." to the demo's own parser.
    commands.add_parser(
        "demo", help="watch a good and a regressed adapter rolled out on the bundled demo model", add_help=False
    )
    return parser


def _run_demo(argv: Sequence[str]) -> int:
    from peftserve.demo import main as demo_main

    return demo_main(list(argv), prog="peftserve demo")


def _run_serve(args: argparse.Namespace) -> int:
    from peftserve.server.startup import StartupError

    try:
        settings = serve_settings(args)
    except ValueError as e:
        return _fail(f"peftserve serve: error: {e}", EXIT_USAGE)
    try:
        if settings.ray.ray:
            _run_ray(settings)
        else:
            from peftserve.server.local import run_server

            run_server(settings)
    except StartupError as e:
        return _fail(f"peftserve serve: error: {e}", EXIT_STARTUP)
    return 0


def _run_ray(settings: ServeSettings) -> None:
    from peftserve.server.startup import StartupError, check_model_dir

    check_model_dir(settings.engine.model.model)
    try:
        from peftserve.server.ray_app import run_ray
    except ImportError as e:
        raise StartupError(
            f"--ray needs Ray Serve ({e}); install it with: pip install 'peftserve[ray]'"
        ) from e
    run_ray(settings)


# ---- peftserve adapters ... ------------------------------------------------------------------

ADAPTER_COLUMNS = ("TASK", "VERSION", "STABLE", "STATUS", "RANK", "SIZE", "SHA256", "CREATED")


def _client_options() -> argparse.ArgumentParser:
    """--server, --token and --json, shared by the commands that talk to a running server."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--server",
        default=os.environ.get("PEFTSERVE_SERVER", "http://127.0.0.1:8000"),
        help="server URL; HOST:PORT means http (default: %(default)s; env PEFTSERVE_SERVER)",
    )
    common.add_argument(
        "--token",
        default=None,
        help="the server's admin token, if it was started with one (default: env PEFTSERVE_ADMIN_TOKEN)",
    )
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return common


def _client(args: argparse.Namespace) -> Any:
    from peftserve.client import Client

    return Client(args.server, admin_token=args.token)


def _call_failed(what: str, error: Exception) -> int:
    """Report a failed call on stderr (exit status 1)."""
    from peftserve.client import MISSING_TOKEN_CODE, PeftserveError

    if isinstance(error, PeftserveError):
        message = error.message
        if error.code == MISSING_TOKEN_CODE:
            message = "this server needs its admin token: pass --token TOKEN or set PEFTSERVE_ADMIN_TOKEN"
        status = f" (HTTP {error.status})" if error.status else ""
        return _fail(f"peftserve {what}: error: {message}{status}", EXIT_STARTUP)
    return _fail(f"peftserve {what}: error: {error}", EXIT_STARTUP)


def add_adapters_parser(commands: Any) -> None:
    """``peftserve adapters upload|list|show|delete|load|unload``."""
    common = _client_options()
    adapters = commands.add_parser("adapters", help="manage the adapters of a running server")
    sub = adapters.add_subparsers(dest="adapters_command", metavar="COMMAND", required=True)
    upload = sub.add_parser("upload", parents=[common], help="upload an adapter directory")
    upload.add_argument("dir", metavar="DIR", help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    upload.add_argument("--name", required=True, help="task name (the API model name)")
    upload.add_argument("--version", required=True, help="version of the task")
    upload.add_argument("--base-fingerprint", default=None, help="refuse unless the server's base model has this fingerprint")
    upload.add_argument("--no-progress", action="store_true", help="no progress bar")
    listing = sub.add_parser("list", parents=[common], help="list registered adapter versions")
    listing.add_argument("--task", default=None, help="only this task's versions")
    show = sub.add_parser("show", parents=[common], help="show a task (TASK) or a version (TASK@VERSION)")
    show.add_argument("ref", metavar="TASK[@VERSION]")
    for name, text in (("delete", "delete a version"), ("load", "load a version into an adapter slot"),
                       ("unload", "free a version's adapter slot")):  # fmt: skip
        action = sub.add_parser(name, parents=[common], help=text)
        action.add_argument("ref", metavar="TASK@VERSION")
    adapters.set_defaults(handler=_run_adapters)


def _run_adapters(args: argparse.Namespace) -> int:
    from peftserve.client import PeftserveError

    command = args.adapters_command
    try:
        with _client(args) as client:
            return _ADAPTER_COMMANDS[command](client, args)
    except BrokenPipeError:
        raise
    except (PeftserveError, OSError, ValueError) as e:
        return _call_failed(f"adapters {command}", e)


def _cmd_upload(client: Any, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from peftserve.client import UPLOAD_FILES, check_adapter_dir

    directory = Path(args.dir)
    check_adapter_dir(directory)
    total = sum((directory / n).stat().st_size for n in UPLOAD_FILES if (directory / n).is_file())
    ref = f"{args.name}@{args.version}"
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=ref,
              file=sys.stderr, disable=True if args.no_progress else None) as bar:  # fmt: skip
        adapter = client.upload(directory, args.name, args.version,
                                base_fingerprint=args.base_fingerprint, progress=bar.update)  # fmt: skip
    if args.json:
        return _print_json(adapter)
    role = "the stable version" if adapter.stable else f"pin it with model {adapter.ref!r}"
    print(f"uploaded {adapter.ref} (rank {adapter.rank}, {_size(adapter.size_bytes)}, "
          f"sha256 {adapter.sha256[:12]}): {role}")  # fmt: skip
    return 0


def _cmd_list(client: Any, args: argparse.Namespace) -> int:
    adapters = client.list(args.task)
    if args.json:
        return _print_json(adapters)
    _print_table(adapters)
    return 0


def _cmd_show(client: Any, args: argparse.Namespace) -> int:
    from peftserve.client import split_ref

    task, version = split_ref(args.ref, need_version=False)
    if version is not None:
        return _print_adapter(client.show(task, version), args.json)
    info = client.task(task)
    if args.json:
        return _print_json(info)
    print(f"task {info.task}: stable version {info.stable or '-'}, {len(info.versions)} versions")
    _print_table(info.versions)
    return 0


def _cmd_action(client: Any, args: argparse.Namespace) -> int:
    adapter = getattr(client, args.adapters_command)(args.ref)
    if args.json:
        return _print_json(adapter)
    done = {"delete": "deleted", "load": "loaded", "unload": "unloaded"}[args.adapters_command]
    print(f"{done} {adapter.ref}" + ("" if args.adapters_command == "delete" else f" (now {adapter.status})"))
    return 0


_ADAPTER_COMMANDS: dict[str, Callable[[Any, argparse.Namespace], int]] = {
    "upload": _cmd_upload, "list": _cmd_list, "show": _cmd_show,
    "delete": _cmd_action, "load": _cmd_action, "unload": _cmd_action,
}  # fmt: skip


# ---- peftserve rollout ... -------------------------------------------------------------------

ROLLOUT_ACTIONS = {"pause": "paused", "resume": "resumed", "promote": "promoted", "rollback": "rolled back",
                   "retry": "retried"}  # fmt: skip
HISTORY_COLUMNS = ("TIME", "EVENT", "WEIGHT", "RESULT", "PROGRESS", "REASON")


def _argument(parser: str) -> Callable[[str], Any]:
    """An argparse type from the client's parser of that name (ValueError -> a usage error)."""

    def convert(text: str) -> Any:
        from peftserve import client

        try:
            return getattr(client, parser)(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def _merged(values: list[dict[str, float]] | None) -> dict[str, float] | None:
    """The --tolerance / --mde flags (each parsed to ``{metric: x}``) as one mapping, or None."""
    return {k: v for d in values for k, v in d.items()} if values else None


def add_rollout_parser(commands: Any) -> None:
    """``peftserve rollout start|status|pause|resume|promote|rollback|retry|history``."""
    common = _client_options()
    rollout = commands.add_parser("rollout", help="start and steer canary rollouts on a running server")
    sub = rollout.add_subparsers(dest="rollout_command", metavar="COMMAND", required=True)
    start = sub.add_parser("start", parents=[common], help="roll a candidate version of a task out")
    start.add_argument("task", metavar="TASK")
    start.add_argument("--candidate", required=True, metavar="VERSION", help="the version to roll out")
    start.add_argument("--stable", default=None, metavar="VERSION", help="the version serving today (default: the task's stable version)")
    start.add_argument("--steps", type=_argument("parse_steps"), default=None, metavar="W1,W2,...", help="candidate weights in percent, increasing (default: 1,5,10,25,50)")
    start.add_argument("--interval", type=float, default=None, metavar="SECONDS", help="least time at each step; a step advances as soon as the evidence suffices after it (default: 30)")
    start.add_argument("--min-samples", type=int, default=None, metavar="N", help="fewest units (users, prompts) per arm before a large-sample test decides (default: 30)")
    start.add_argument("--tolerance", type=_argument("parse_metric_values"), action="append", default=None, metavar="METRIC=X", help="harm accepted on METRIC before a rollback, e.g. latency=0.2 (relative metrics: a fraction); repeatable")
    start.add_argument("--mde", type=_argument("parse_metric_values"), action="append", default=None, metavar="METRIC=X", help="smallest harm on METRIC a promotion must rule out, e.g. probe_accuracy=0.05; repeatable")
    start.add_argument("--probe-temperature", type=float, default=None, metavar="T", help="sample the probes at T (> 0: the eval set is cycled, answers are repeated measurements; default 0, greedy: each prompt once per version)")
    start.add_argument("--shadow-percent", type=float, default=None, metavar="P", help="share of stable requests also copied to the candidate; above 0 the rollout starts in a shadow phase")
    start.add_argument("--eval-set", type=Path, default=None, metavar="FILE.jsonl", help="known-answer probes, one {\"prompt\", \"answer\"} per line (judged as probe_accuracy)")
    start.add_argument("--target-header", type=_argument("parse_target_header"), action="append", default=None, metavar="HEADER=V1[,V2]", help="only requests whose header holds one of the values may reach the candidate (repeatable; all must match)")
    start.add_argument("--reason", default=None, help="why, for the history")
    status = sub.add_parser("status", parents=[common], help="where a task's rollout stands and what its next decision waits for (all rollouts without TASK)")
    status.add_argument("task", metavar="TASK", nargs="?")
    status.add_argument("--watch", action="store_true", help="follow the rollout live until it ends (Ctrl-C stops)")
    status.add_argument("--every", type=float, default=2.0, metavar="SECONDS", help="refresh period of --watch (default: %(default)s)")
    for name, text in (("pause", "stop the automatic progression (the weight stays)"),
                       ("resume", "resume a paused rollout"), ("promote", "promote the candidate now"),
                       ("rollback", "roll back now (the candidate's weight drops to 0)"),
                       ("retry", "start a rolled-back rollout again")):  # fmt: skip
        action = sub.add_parser(name, parents=[common], help=text)
        action.add_argument("task", metavar="TASK")
        action.add_argument("--reason", default=None, help="why, for the history")
    history = sub.add_parser("history", parents=[common], help="a rollout's judgments, decisions and state changes")
    history.add_argument("task", metavar="TASK")
    history.add_argument("--limit", type=int, default=100, help="latest N events (default: %(default)s)")
    history.add_argument("--kind", action="append", default=None, help="only events of this kind: state, judgment, decision, evaluator_error, unload, restored (repeatable)")
    rollout.set_defaults(handler=_run_rollout)


def _run_rollout(args: argparse.Namespace) -> int:
    from peftserve.client import PeftserveError

    command = args.rollout_command
    try:
        with _client(args) as client:
            return _ROLLOUT_COMMANDS.get(command, _cmd_rollout_action)(client, args)
    except BrokenPipeError:
        raise
    except (PeftserveError, OSError, ValueError) as e:
        return _call_failed(f"rollout {command}", e)


def _cmd_rollout_start(client: Any, args: argparse.Namespace) -> int:
    rollout = client.start_rollout(
        args.task, args.candidate, stable=args.stable, steps=args.steps, interval=args.interval,
        min_samples=args.min_samples, shadow_percent=args.shadow_percent, eval_set=args.eval_set,
        target_header=args.target_header, reason=args.reason, tolerance=_merged(args.tolerance),
        mde=_merged(args.mde), probe_temperature=args.probe_temperature,
    )  # fmt: skip
    if args.json:
        return _print_json(rollout)
    print(f"started rollout #{rollout.rollout_id}")
    _print_rollout(rollout)
    return 0


def _cmd_rollout_status(client: Any, args: argparse.Namespace) -> int:
    if args.watch:
        return _watch_rollout(client, args)
    rollouts = [client.rollout(args.task)] if args.task else client.rollouts()
    if args.json:
        return _print_json(rollouts[0] if args.task else rollouts)
    if not rollouts:
        print("no rollouts")
    for i, rollout in enumerate(rollouts):
        if i:
            print()
        _print_rollout(rollout)
    return 0


def _watch_rollout(client: Any, args: argparse.Namespace) -> int:
    """Redraw the status every ``--every`` seconds until the rollout ends (or Ctrl-C)."""
    if not args.task:
        return _fail("peftserve rollout status: error: --watch needs a TASK", EXIT_USAGE)
    tty = sys.stdout.isatty()
    try:
        while True:
            rollout = client.rollout(args.task)
            if tty:
                print("\033[2J\033[H", end="")  # clear the screen, cursor home
            print(time.strftime("%H:%M:%S"), end="  ")
            _print_rollout(rollout)
            sys.stdout.flush()
            if not rollout.active:
                return 0
            time.sleep(max(args.every, 0.1))
            if not tty:
                print()
    except KeyboardInterrupt:
        return 0


def _cmd_rollout_action(client: Any, args: argparse.Namespace) -> int:
    rollout = getattr(client, f"{args.rollout_command}_rollout")(args.task, args.reason)
    if args.json:
        return _print_json(rollout)
    print(f"{ROLLOUT_ACTIONS[args.rollout_command]} the rollout of {args.task}")
    _print_rollout(rollout)
    return 0


def _cmd_rollout_history(client: Any, args: argparse.Namespace) -> int:
    events = client.rollout_history(args.task, args.limit, args.kind)
    if args.json:
        return _print_json(events)
    rows = [HISTORY_COLUMNS] + [_history_row(e) for e in events]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HISTORY_COLUMNS) - 1)]
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)]
        print("  ".join([*cells, row[-1]]).rstrip())
    return 0


_ROLLOUT_COMMANDS: dict[str, Callable[[Any, argparse.Namespace], int]] = {
    "start": _cmd_rollout_start, "status": _cmd_rollout_status, "history": _cmd_rollout_history,
}  # fmt: skip


def _history_row(event: Any) -> tuple[str, ...]:
    if event.kind == "state":
        what = f"state {event.state_from or 'start'} -> {event.state_to}"
    elif event.kind == "decision":
        what = f"decision {event.action}"
    else:
        what = event.kind
    weight = f"{event.weight:g} %" if event.weight is not None else ""
    progress = f"{event.progress:.0%}" if event.progress is not None else ""
    result = event.result or ""
    return (_when(event.at), what, weight, result, progress, event.reason or "")


def _print_rollout(r: Any) -> None:
    spec = r.spec
    print(r.summary)
    steps = ", ".join(f"{s:g}" for s in r.steps)
    lines = [("steps", f"{steps} % (at least {spec.get('step_interval_s', 0):g} s each)"),
             ("started", f"{_when(r.started_at)}; last change {_when(r.updated_at)}")]  # fmt: skip
    j = r.last_judgment
    if j is not None:
        progress = f"progress {j.progress:.0%}" if j.progress is not None else "progress unknown"
        lines.append(("judgment", f"{j.result}, {progress}, {_when(j.at)}: {j.reason}"))
    if r.last_decision:
        lines.append(("decision", f"{r.last_decision.get('action')}: {r.last_decision.get('reason')}"))
    nxt = r.next or {}
    for m in nxt.get("metrics", ()):
        need = f"~{m['needed']:.0f}" if m.get("needed") is not None else "?"
        left = f", ~{_seconds(m['time_left_s'])} left" if m.get("time_left_s") is not None else ""
        harm = f", harm {m['harm']:+.3g} (upper {m['upper']:+.3g} vs mde {m['mde']:g})" \
            if m.get("harm") is not None and m.get("upper") is not None else ""
        lines.append((f"  {m['name']}", f"{m['status']}: {m['samples']:.0f} of {need} samples{left}{harm}"))
    if r.plan and r.plan.get("warnings"):
        lines.extend(("warning", w) for w in r.plan["warnings"])
    for arm, version in (("stable", r.stable), ("candidate", r.candidate)):
        lines.append((arm, f"{version}: {_arm_line(r.arms.get(arm) or {})}"))
    if r.shadow:
        lines.append(("shadow", _shadow_line(r.shadow)))
    for key, value in lines:
        print(f"  {key:<10} {value}")


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else (f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h")


def _arm_line(arm: dict[str, Any]) -> str:
    parts = [f"{arm.get('requests', 0)} requests ({arm.get('in_experiment', 0)} judged)",
             f"{arm.get('errors', 0)} errors"]  # fmt: skip
    if arm.get("mean_latency_e2e") is not None:
        parts.append(f"mean latency {arm['mean_latency_e2e']:.3f} s")
    if arm.get("feedback"):
        parts.append(f"feedback {arm['mean_feedback_score']:.2f} (n={arm['feedback']})")
    if arm.get("probes"):
        parts.append(f"probe accuracy {arm['probe_accuracy']:.0%} (n={arm['probes']})")
    return ", ".join(parts)


def _shadow_line(shadow: dict[str, Any]) -> str:
    parts = [f"{shadow.get('n', 0)} copies, {shadow.get('errors', 0)} errors"]
    if shadow.get("agreement_rate") is not None:
        parts.append(f"agreement {shadow['agreement_rate']:.0%}")
    if shadow.get("divergence") is not None:
        parts.append(f"divergence {shadow['divergence']:.4f} nats/token")
    elif shadow.get("mean_llr") is None:
        parts.append("no divergence (the engine cannot score)")
    return ", ".join(parts)


def _print_adapter(adapter: Any, as_json: bool) -> int:
    if as_json:
        return _print_json(adapter)
    fields = dataclasses.asdict(adapter)
    fields["target_modules"] = ", ".join(adapter.target_modules)
    fields["size_bytes"] = f"{adapter.size_bytes} ({_size(adapter.size_bytes)})"
    fields["created_at"] = _when(adapter.created_at)
    width = max(map(len, fields))
    print(f"{'ref':<{width}}  {adapter.ref}")
    for key, value in fields.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _print_table(adapters: Sequence[Any]) -> None:
    rows = [ADAPTER_COLUMNS] + [
        (a.task, a.version, "yes" if a.stable else "", a.status, str(a.rank), _size(a.size_bytes),
         a.sha256[:12], _when(a.created_at))
        for a in adapters
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(ADAPTER_COLUMNS))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _print_json(value: Any) -> int:
    data = [dataclasses.asdict(v) for v in value] if isinstance(value, list) else dataclasses.asdict(value)
    print(json.dumps(data, indent=2))
    return 0


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _fail(message: str, code: int) -> int:
    sys.stderr.write(" ".join(message.split()) + "\n")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["demo"]:  # the demo parses its own flags (peftserve demo --help)
            return _run_demo(argv[1:])
        args = build_parser().parse_args(argv)
        code = args.handler(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader stopped reading (``| head -1``): what was asked is done, the rest of the
        # output has nowhere to go. Point stdout at devnull so the flush at exit cannot fail.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
