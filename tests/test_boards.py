"""Board profiles: detection from recorded machine facts, overrides, and the CLI's --board plumbing."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from parsicore import boards
from parsicore.errors import BackendError

REPO = Path(__file__).resolve().parent.parent
FIXTURES = boards.profiles_dir() / "fixtures"
PROFILES = boards.load_profiles()
#: Fixture directory -> the profile it must detect as (the rest are named after their profile).
EXPECTED = {"unknown-aarch64": "generic-aarch64"}
FIXTURE_DIRS = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


def facts_of(fixture: str, **changes: object) -> boards.MachineFacts:
    return dataclasses.replace(boards.MachineFacts.from_dir(FIXTURES / fixture), **changes)


def settings_of(fixture: str, board: str | None = None, numba: bool = True, **changes: object) -> boards.Settings:
    return boards.resolve(board, facts=facts_of(fixture, **changes), profiles=PROFILES, numba=numba)


# ----------------------------------------------------------------------------------------------- profiles


def test_every_profile_loads_with_a_setup_note_and_a_fixture():
    expected = {"raspberry-pi-4", "raspberry-pi-5", "jetson-orin", "jetson-nano", "android-termux",
                "generic-aarch64", "generic-x86-64"}
    assert set(PROFILES) == expected
    for name, p in PROFILES.items():
        assert (boards.profiles_dir() / f"{name}.json").is_file()
        assert p.setup.install and p.setup.python and p.setup.os, name
        assert name in {EXPECTED.get(f, f) for f in FIXTURE_DIRS}, f"no fixture detects as {name}"


def test_profile_validation_names_the_file():
    raw = json.loads((boards.profiles_dir() / "raspberry-pi-4.json").read_text())
    raw["defaults"]["threads"] = "many"
    with pytest.raises(BackendError, match="broken.json: threads"):
        boards.parse_profile(raw, "broken.json")
    raw["defaults"]["threads"] = "all"
    raw["defaults"]["numba_threading_layer_priority"] = ["omp", "omp", "tbb"]
    with pytest.raises(BackendError, match="numba_threading_layer_priority"):
        boards.parse_profile(raw, "broken.json")
    raw["defaults"]["numba_threading_layer_priority"] = ["omp", "tbb", "workqueue"]
    raw["detect"]["cpu_parts"] = ["d08"]
    with pytest.raises(BackendError, match="CPU part 'd08'"):
        boards.parse_profile(raw, "broken.json")


# ----------------------------------------------------------------------------------------------- detection


@pytest.mark.parametrize("fixture", FIXTURE_DIRS)
def test_each_fixture_detects_as_its_board(fixture):
    detection = boards.detect_board(boards.MachineFacts.from_dir(FIXTURES / fixture), PROFILES)
    assert detection.profile.name == EXPECTED.get(fixture, fixture)
    if fixture in EXPECTED:
        assert detection.notice and "\n" not in detection.notice
        assert "unknown aarch64 machine" in detection.notice and "Neoverse N1" in detection.notice
    else:
        assert detection.notice is None


def test_fixture_facts_are_parsed():
    pi4 = facts_of("raspberry-pi-4")
    assert pi4.device_tree_model == "Raspberry Pi 4 Model B Rev 1.4"  # trailing NUL dropped
    assert pi4.cpu_parts == [(0x41, 0xD08)] * 4 and pi4.processors == 4
    assert pi4.arch == "aarch64" and "asimd" in pi4.cpu_flags
    assert "avx512f" in facts_of("generic-x86-64").cpu_flags
    assert facts_of("android-termux").environ["PREFIX"] == "/data/data/com.termux/files/usr"


def test_cpu_parts_alone_detect_a_board_without_device_tree():
    # e.g. a Pi 4 inside a container that hides /proc/device-tree
    detection = boards.detect_board(facts_of("raspberry-pi-4", device_tree_model=""), PROFILES)
    assert detection.profile.name == "raspberry-pi-4" and detection.notice is None
    assert "Cortex-A72" in detection.reason and "no device-tree model" in detection.reason


def test_mixed_unknown_cores_fall_back_to_generic():
    # RK3588-like: 4x A76 + 4x A55 is not a Pi 5 even though it has A76 cores
    cpuinfo = "".join(f"processor\t: {i}\nCPU implementer\t: 0x41\nCPU part\t: {p}\n\n"
                      for i, p in enumerate(["0xd05"] * 4 + ["0xd0b"] * 4))
    facts = boards.MachineFacts(cpuinfo=cpuinfo, device_tree_model="Radxa ROCK 5B", machine="aarch64")
    detection = boards.detect_board(facts, PROFILES)
    assert detection.profile.name == "generic-aarch64" and "Radxa ROCK 5B" in detection.notice
    settings = boards.effective_settings(detection.profile, "detected", facts, True)
    assert settings.threads.value == 4 and "big cores" in settings.threads.source


def test_32bit_userland_is_detected_with_a_notice():
    detection = boards.detect_board(facts_of("raspberry-pi-4", machine="armv7l"), PROFILES)
    assert detection.profile.name == "raspberry-pi-4"
    assert "32-bit" in detection.notice and "unsupported" in detection.notice


def test_unknown_architecture_is_a_notice_not_an_error():
    facts = boards.MachineFacts(cpuinfo="processor\t: 0\nisa\t\t: rv64imafdc\n", machine="riscv64")
    profile, notice = boards.detect(facts, PROFILES)
    assert profile.name.startswith("generic-") and "riscv64" in notice


@given(cpuinfo=st.text(max_size=300), model=st.text(max_size=40), machine=st.sampled_from(
    ["aarch64", "arm64", "x86_64", "armv7l", "riscv64", "", "ppc64le"]),
    environ=st.dictionaries(st.sampled_from(["PREFIX", "TERMUX_VERSION", "HOME"]), st.text(max_size=20)))
def test_detection_never_raises(cpuinfo, model, machine, environ):
    facts = boards.MachineFacts(cpuinfo=cpuinfo, device_tree_model=model, environ=environ, machine=machine,
                                cpu_flags=boards.parse_cpu_flags(cpuinfo))
    detection = boards.detect_board(facts, PROFILES)
    assert detection.profile.name in PROFILES
    assert detection.notice is None or "\n" not in detection.notice
    boards.effective_settings(detection.profile, "detected", facts, numba_installed=False)


# ----------------------------------------------------------------------------------------------- settings


def test_profile_defaults():
    pi4 = settings_of("raspberry-pi-4")
    assert (pi4.threads.value, pi4.backend.value, pi4.openblas_coretype.value) == (4, "numba", "CORTEXA72")
    assert pi4.board_source.startswith("detected: device-tree model")
    assert pi4.exports["OPENBLAS_CORETYPE"] == "CORTEXA72"
    assert pi4.exports["NUMBA_THREADING_LAYER_PRIORITY"] == "omp tbb workqueue"
    assert all(pi4.exports[v] == "4" for v in boards.THREAD_VARIABLES)
    assert settings_of("jetson-orin").threads.value == 6
    assert settings_of("raspberry-pi-5").openblas_coretype.value == "NEOVERSEN1"


def test_termux_uses_big_cores_only():
    s = settings_of("android-termux")  # 4x A55 + 3x A78 + 1x X1, no sysfs capacities
    assert s.threads.value == 4 and "big cores: 4 of 8" in s.threads.source
    assert s.openblas_coretype.value is None and "OPENBLAS_CORETYPE" not in s.exports
    by_capacity = settings_of("android-termux", cpu_capacity=(250,) * 4 + (870,) * 3 + (1024,))
    assert by_capacity.threads.value == 4 and "cpu_capacity" in by_capacity.threads.source
    assert boards.count_threads("big_cores", facts_of("raspberry-pi-5")) == (4, "big cores: all cores alike")
    assert boards.count_threads("big_cores", boards.MachineFacts(cpu_capacity=(1024,) * 4, cpu_count=4))[0] == 4
    assert boards.count_threads(16, facts_of("jetson-nano"))[0] == 4
    assert settings_of("android-termux", cpu_count=3).threads.value == 3  # capped at the usable CPUs


def test_x86_coretype_follows_cpu_flags():
    with_avx512 = settings_of("generic-x86-64")
    assert with_avx512.openblas_coretype.value == "SkylakeX" and "avx512f" in with_avx512.openblas_coretype.source
    flags = frozenset(f for f in facts_of("generic-x86-64").cpu_flags if not f.startswith("avx512"))
    without = settings_of("generic-x86-64", cpu_flags=flags)
    assert without.openblas_coretype.value is None and "OPENBLAS_CORETYPE" not in without.exports


def test_environment_overrides_the_profile():
    env = {"HOME": "/home/pi", "PARSICORE_THREADS": "2", "OPENBLAS_CORETYPE": "ARMV8", "PARSICORE_BACKEND": "numpy",
           "NUMBA_THREADING_LAYER": "workqueue", "PARSICORE_CACHE_DIR": "/srv/cache"}
    s = settings_of("raspberry-pi-4", environ=env)
    assert (s.threads.value, s.threads.source) == (2, "env PARSICORE_THREADS")
    assert (s.openblas_coretype.value, s.openblas_coretype.source) == ("ARMV8", "env OPENBLAS_CORETYPE")
    assert (s.backend.value, s.backend.source) == ("numpy", "env PARSICORE_BACKEND")
    assert s.numba_threading_layer.value == "workqueue"
    assert s.numba_cache_dir.value == str(Path("/srv/cache") / "numba")
    # the user's own variables are not re-exported; derived ones are
    assert "OPENBLAS_CORETYPE" not in s.exports and "PARSICORE_BACKEND" not in s.exports
    assert "NUMBA_THREADING_LAYER_PRIORITY" not in s.exports and s.exports["OPENBLAS_NUM_THREADS"] == "2"
    assert settings_of("raspberry-pi-4", environ={"NUMBA_CACHE_DIR": "/x"}).numba_cache_dir.source == \
        "env NUMBA_CACHE_DIR"


@pytest.mark.parametrize("var, value", [("PARSICORE_THREADS", "0"), ("PARSICORE_THREADS", "four"),
                                        ("PARSICORE_BACKEND", "cuda")])
def test_malformed_override_is_a_one_line_error(var, value):
    with pytest.raises(BackendError, match=var) as info:
        settings_of("raspberry-pi-4", environ={var: value})
    assert "\n" not in str(info.value)


def test_numba_missing_means_numpy_backend():
    s = settings_of("android-termux", numba=False)
    assert s.backend.value == "numpy" and "numba is not installed" in s.backend.source
    assert "PARSICORE_BACKEND" not in s.exports  # the library's own default, nothing to export
    assert s.numba_threading_layer.value is None and s.numba_cache_dir.value is None
    assert "NUMBA_THREADING_LAYER_PRIORITY" not in s.exports
    numpy_board = dataclasses.replace(PROFILES["raspberry-pi-4"], backend="numpy")
    forced = boards.effective_settings(numpy_board, "--board", facts_of("raspberry-pi-4"), numba_installed=True)
    assert forced.backend.value == "numpy" and forced.exports["PARSICORE_BACKEND"] == "numpy"


def test_board_option_overrides_detection_and_env():
    s = settings_of("raspberry-pi-4", board="jetson-nano")
    assert s.board.name == "jetson-nano" and s.board_source == "--board" and s.openblas_coretype.value == "CORTEXA57"
    env = {"PARSICORE_BOARD": "raspberry-pi-5"}
    assert settings_of("raspberry-pi-4", environ=env).board.name == "raspberry-pi-5"
    assert settings_of("raspberry-pi-4", environ=env).board_source == "env PARSICORE_BOARD"
    assert settings_of("raspberry-pi-4", board="jetson-orin", environ=env).board.name == "jetson-orin"


def test_foreign_board_does_not_export_its_blas_kernel():
    s = settings_of("generic-x86-64", board="raspberry-pi-4")
    assert s.openblas_coretype.value is None and "is for aarch64" in s.openblas_coretype.source
    assert "OPENBLAS_CORETYPE" not in s.exports


def test_unknown_board_name_is_an_error():
    with pytest.raises(BackendError, match="unknown board 'raspberry-pi-9'.*choose from") as info:
        settings_of("raspberry-pi-4", board="raspberry-pi-9")
    assert "\n" not in str(info.value)
    with pytest.raises(BackendError, match="PARSICORE_BOARD"):
        settings_of("raspberry-pi-4", environ={"PARSICORE_BOARD": "nope"})


def test_apply_to_environment_keeps_the_users_variables():
    s = settings_of("raspberry-pi-4")
    environ = {"OMP_NUM_THREADS": "1"}
    added = boards.apply_to_environment(s, environ)
    assert environ["OMP_NUM_THREADS"] == "1" and "OMP_NUM_THREADS" not in added
    assert environ["OPENBLAS_CORETYPE"] == "CORTEXA72" and environ["NUMBA_NUM_THREADS"] == "4"
    assert boards.apply_to_environment(s, environ) == {}  # idempotent


def test_board_option_value_reads_only_group_options():
    assert boards.board_option_value(["--board", "jetson-nano", "run", "x.png"]) == "jetson-nano"
    assert boards.board_option_value(["--board=raspberry-pi-5", "boards"]) == "raspberry-pi-5"
    assert boards.board_option_value(["run", "--board", "x"]) is None
    assert boards.board_option_value(["--board"]) is None
    assert boards.board_option_value([]) is None


def test_default_cache_dir_follows_the_environment(tmp_path):
    assert boards.default_cache_dir({"PARSICORE_CACHE_DIR": str(tmp_path / "pc"), "XDG_CACHE_HOME": "/x"}) == (
        tmp_path / "pc" / "numba")
    assert boards.default_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "parsicore" / "numba"
    assert boards.default_cache_dir({"HOME": str(tmp_path)}) == tmp_path / ".cache" / "parsicore" / "numba"


# ----------------------------------------------------------------------------------------------- CLI


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PARSICORE_", "OPENBLAS_", "NUMBA_"))}
    base["PYTHONPATH"] = str(REPO) + os.pathsep + base.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "parsicore", *args], capture_output=True, text=True,
                          env={**base, **(env or {})}, timeout=120, cwd=REPO)


def test_cli_board_option_selects_the_profile():
    result = run_cli("--board", "raspberry-pi-4", "boards")
    assert result.returncode == 0, result.stderr
    assert "* raspberry-pi-4" in result.stdout
    assert any(line.split()[:2] == ["board", "raspberry-pi-4"] and "--board" in line
               for line in result.stdout.splitlines())


def test_cli_boards_json_shows_sources():
    result = run_cli("boards", "--json", env={"PARSICORE_BOARD": "jetson-orin", "PARSICORE_THREADS": "3"})
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["settings"]["board"] == {"value": "jetson-orin", "source": "env PARSICORE_BOARD"}
    assert data["settings"]["threads"] == {"value": "3", "source": "env PARSICORE_THREADS"}
    assert set(data["profiles"]) == set(PROFILES)


@pytest.mark.parametrize("args, env", [(["--board", "raspberry-pi-9", "boards"], None),
                                       (["boards"], {"PARSICORE_BOARD": "nope"})])
def test_cli_unknown_board_exits_2_with_one_line(args, env):
    result = run_cli(*args, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("parsicore: error: unknown board"), result.stderr


def test_cli_exports_the_settings_before_running_the_command():
    code = ("import os, sys\nfrom parsicore.cli import main\nsys.argv = ['parsicore', 'boards', '--json']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('OPENBLAS_NUM_THREADS'), os.environ.get('NUMBA_NUM_THREADS'))")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PARSICORE_", "OPENBLAS_", "NUMBA_", "OMP_"))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                            env={**base, "PYTHONPATH": str(REPO), "PARSICORE_THREADS": "3"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "3 3"


def test_cli_import_leaves_numpy_unloaded_so_blas_settings_apply():
    code = ("import sys\nimport parsicore.cli\nloaded_early = 'numpy' in sys.modules\n"
            "from parsicore.cli import _apply_board\n_apply_board(['boards'])\nimport numpy\n"
            "try:\n    import threadpoolctl\n"
            "    threads = [i['num_threads'] for i in threadpoolctl.threadpool_info() if i['user_api'] == 'blas']\n"
            "except ImportError:\n    threads = []\nprint(loaded_early, threads)\n")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PARSICORE_", "OPENBLAS_", "NUMBA_", "OMP_"))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                            env={**base, "PYTHONPATH": str(REPO), "PARSICORE_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    loaded_early, threads = result.stdout.strip().split(" ", 1)
    assert loaded_early == "False"
    assert threads in ("[]", "[1]")  # OpenBLAS started with the board's thread count


def test_cli_runner_path_resolves_without_touching_the_environment(monkeypatch):
    from parsicore.cli import cli

    monkeypatch.delenv("PARSICORE_BOARD", raising=False)
    before = dict(os.environ)
    result = CliRunner().invoke(cli, ["--board", "jetson-nano", "boards"])
    assert result.exit_code == 0, result.output
    assert "* jetson-nano" in result.output and dict(os.environ) == before


def test_readme_lists_every_profile_and_fixture():
    readme = (boards.profiles_dir() / "README.md").read_text(encoding="utf-8")
    for name in PROFILES:
        assert f"| `{name}` |" in readme, f"boards/README.md's table lacks {name}"
    for fixture in FIXTURE_DIRS:
        assert fixture in readme
