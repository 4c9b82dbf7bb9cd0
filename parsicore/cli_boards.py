"""``parsicore boards``: the board profiles, the one detected here, and the effective settings with their sources."""

from __future__ import annotations

import json

import click

from parsicore import boards


@click.command(name="boards")
@click.option("--json", "as_json", is_flag=True, help="Print profiles, detection and settings as JSON.")
@click.option("--setup", "show_setup", is_flag=True, help="Also print the set-up note of the board in use.")
@click.pass_context
def boards_command(ctx: click.Context, as_json: bool, show_setup: bool) -> None:
    """List the board profiles, mark the one in use, and show the effective settings and where each comes from.

    Choose a profile with `parsicore --board NAME ...` or PARSICORE_BOARD; override single settings with
    PARSICORE_THREADS, PARSICORE_BACKEND, PARSICORE_CACHE_DIR, OPENBLAS_CORETYPE, NUMBA_THREADING_LAYER,
    NUMBA_CACHE_DIR.
    """
    settings = ctx.find_root().obj
    if not isinstance(settings, boards.Settings):
        settings = boards.resolve()
    profiles = boards.load_profiles()
    facts = boards.MachineFacts.read()
    detected = boards.detect_board(facts, profiles)
    if as_json:
        click.echo(json.dumps({
            "profiles": {name: {"title": p.title, "arch": p.arch, "cpu": p.cpu} for name, p in profiles.items()},
            "detected": {"board": detected.profile.name, "reason": detected.reason, "notice": detected.notice},
            "settings": {name: {"value": value, "source": source} for name, value, source in settings.rows()},
            "exports": dict(settings.exports),
        }))
        return
    width = max(len(n) for n in profiles)
    click.echo("board profiles (* = in use):")
    for name, p in profiles.items():
        mark = "*" if name == settings.board.name else " "
        click.echo(f"  {mark} {name.ljust(width)}  {p.title}")
    click.echo(f"detected here: {detected.profile.name} ({detected.reason})")
    click.echo("effective settings:")
    rows = settings.rows()
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    for name, value, source in rows:
        click.echo(f"  {name.ljust(w0)}  {value.ljust(w1)}  <- {source}")
    if show_setup:
        note = settings.board.setup
        click.echo(f"set-up on {settings.board.name}: {note.os}; Python {note.python}")
        for line in note.install:
            click.echo(f"  $ {line}")
        for line in note.pitfalls:
            click.echo(f"  - {line}")

