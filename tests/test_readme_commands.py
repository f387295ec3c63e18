"""Every line of the README's "Command line" block runs, as typed, under the defaults users get.

The lines are parsed from README.md (not copied here), so the README cannot drift from what
works. Each runs in bash as typed (its quotes, `> FILE` and globs are bash's), with no --quant/--dtype
flag and no ENTROPIX_* variable: the default weight mode is what a user gets. The `entropix` bash
finds is a shim that hands the line's argv and file descriptors to one long-lived process running
`entropix.cli.main` (tests/readme_driver.py), which keeps torch imported and the model the CLI
loaded between lines; tests/test_cli.py runs the installed console script itself. Each test checks
that the CLI got the argv this file expects from the line. The only adaptations (readme_driver.adapt)
are small --max-tokens / --limit (bench: --tokens, --repeats, --prompt-tokens; --no-transformers, or
--no-rss with --peer), --branches 2 where the sampler is cot or auto, the head of the shipped prompt
set for calibrate (--prompts), so the file stays quick, and a temporary working folder so that output
files land there. Lines run in README order in one shared folder, so `plot run.json` reads what
`generate ... --json > run.json` wrote; a line run alone (-k) first runs the lines that produce its
input files.
"""

from __future__ import annotations

import fnmatch
import glob
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from readme_driver import CALIBRATION_COUNT, adapt, write_shim

pytestmark = pytest.mark.slow  # end to end on the embedded model (make test-fast leaves it out)

README = Path(__file__).resolve().parents[1] / "README.md"

TIMEOUT = 900  # seconds per line: a hang fails the line instead of blocking the suite

OUTPUT_FLAGS = ("-o", "--out", "--compute-plot")  # options whose value is a file the command writes
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def readme_command_lines() -> list[str]:
    """The non-comment lines of the ```bash block right under `## Command line`."""
    text = README.read_text(encoding="utf-8")
    m = re.search(r"^## Command line\s*\n+```bash\n(.*?)^```", text, re.M | re.S)
    assert m, "README.md has no ```bash block right under '## Command line'"
    return [ln.strip() for ln in m.group(1).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


LINES = readme_command_lines()


@dataclass
class Command:
    line: str
    argv: list[str]  # after "entropix", adapted
    stdout_file: str | None  # `> FILE` in the README line

    @property
    def sub(self) -> str:
        return self.argv[0]

    def option(self, *names: str) -> str | None:
        for i, tok in enumerate(self.argv):
            if tok in names and i + 1 < len(self.argv):
                return self.argv[i + 1]
        return None

    def outputs(self) -> list[str]:
        outs = [v for i, t in enumerate(self.argv[:-1]) if t in OUTPUT_FLAGS for v in [self.argv[i + 1]]]
        return outs + ([self.stdout_file] if self.stdout_file else [])

    def inputs(self) -> list[str]:
        """Positional file arguments (plot's RUN, eval-report's RESULTS), globs included."""
        if self.sub not in ("plot", "eval-report"):
            return []
        args, skip = [], False
        for tok in self.argv[1:]:
            if skip:
                skip = False
            elif tok.startswith("-"):
                skip = "=" not in tok  # every option of these two subcommands takes a value
            else:
                args.append(tok)
        return args


def parse(line: str) -> Command:
    tokens = shlex.split(line, comments=True)
    assert tokens and tokens[0] == "entropix", f"README command line does not start with `entropix`: {line!r}"
    stdout_file = None
    if ">" in tokens:
        i = tokens.index(">")
        assert i == len(tokens) - 2, f"only a trailing `> FILE` redirection is supported: {line!r}"
        stdout_file, tokens = tokens[i + 1], tokens[:i]
    # Lines must be real commands: no "..." placeholder prompts, no [--optional] brackets.
    for tok in tokens:
        assert tok != "..." and not tok.startswith("["), f"README line is not a runnable command: {line!r}"
    argv = adapt(tokens[1:])
    return Command(line, argv, stdout_file)


def skip_reason(cmd: Command) -> str | None:
    if cmd.sub == "download":
        return "needs a network"
    if cmd.sub == "serve":
        return "a long-running server: tests/test_server.py and tests/test_serve_concurrent.py start it"
    if cmd.sub == "chat":
        return "interactive: tests/test_cli.py::test_chat_multi_turn_over_stdin drives it over stdin (the console script)"
    if "llama.cpp" in cmd.argv:  # --peer llama.cpp / --engine llama.cpp need the optional engine
        try:
            importlib.import_module("llama_cpp")
        except ImportError as e:
            return f"llama.cpp is an optional engine and llama_cpp cannot be imported here ({e})"
    return None


def producers(index: int) -> list[int]:
    """Earlier runnable lines that write a file this line reads."""
    wanted = parse(LINES[index]).inputs()
    found = []
    for j in range(index):
        earlier = parse(LINES[j])
        if skip_reason(earlier) is None and any(fnmatch.fnmatch(o, w) for o in earlier.outputs() for w in wanted):
            found.append(j)
    return found


def expand(tok: str, cwd: Path) -> list[str]:
    # What bash makes of a glob (results/*.jsonl) in the working folder: the sorted matches, or
    # the glob as typed when nothing matches (and the command then reports the missing file).
    if glob.has_magic(tok):
        return sorted(glob.glob(tok, root_dir=cwd)) or [tok]
    return [tok]


def default_env(shim_dir: Path) -> dict[str, str]:
    # No ENTROPIX_* variable may reach the command: it runs the defaults a user gets
    # (ENTROPIX_QUANT would change the weight mode, ENTROPIX_API_KEY the server's auth, ...).
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENTROPIX_")}
    return {**env, "PATH": os.pathsep.join([str(shim_dir), env.get("PATH", "")])}


@dataclass
class Result:
    cmd: Command
    returncode: int
    stdout: str
    stderr: str
    ran: list[str] | None  # the argv entropix.cli.main got (None: no command reached it)
    server_log: str = ""

    def why(self) -> str:
        return (f"`{self.cmd.line}` ran as {self.ran}, exit {self.returncode}; stderr tail:\n{self.stderr[-2000:]}"
                + (f"\nthe driver's own stderr:\n{self.server_log[-2000:]}" if self.server_log.strip() else ""))


class Runner:
    """Runs README lines in one folder, each at most once, producers before consumers, through one
    driver process (tests/readme_driver.py) that bash reaches through the `entropix` shim."""

    def __init__(self, base: Path):
        # base/work: the lines' working folder; base/driver: the driver's socket, log and `entropix` shim;
        # base itself: the calibration prompts the driver writes for the adapted calibrate line
        self.cwd, driver = base / "work", base / "driver"
        self.cwd.mkdir()
        driver.mkdir()
        self.results: dict[int, Result] = {}
        self.sock, self.log, self.err = driver / "driver.sock", driver / "ran.jsonl", driver / "driver.err"
        self.env = default_env(write_shim(driver, self.sock).parent)
        with open(self.err, "w") as err:
            self.server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("readme_driver.py")), "serve",
                                            str(self.sock), str(self.log)], env=self.env, stdin=subprocess.DEVNULL,
                                           stdout=err, stderr=err)
        deadline = time.monotonic() + 120
        while not self.sock.exists() and self.server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)  # the driver binds its socket before importing anything heavy

    def close(self) -> None:
        self.server.terminate()
        try:
            self.server.wait(30)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()

    def run(self, index: int) -> Result:
        if index in self.results:
            return self.results[index]
        cmd = parse(LINES[index])
        for j in producers(index):
            dep = self.run(j)
            assert dep.returncode == 0, f"input of `{cmd.line}` comes from `{dep.cmd.line}`, which failed: {dep.why()}"
        before = self.ran()
        proc = subprocess.run(["bash", "-c", cmd.line], cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=TIMEOUT)
        runs = self.ran()[len(before):]
        assert len(runs) <= 1, f"`{cmd.line}` ran entropix {len(runs)} times: {runs}"
        stdout = (self.cwd / cmd.stdout_file).read_text() if cmd.stdout_file else proc.stdout
        result = self.results[index] = Result(cmd, proc.returncode, stdout, proc.stderr,
                                              runs[0]["argv"] if runs else None, self.err.read_text())
        return result

    def ran(self) -> list[dict]:
        """What the driver ran so far, in order."""
        return [json.loads(ln) for ln in self.log.read_text().splitlines()] if self.log.exists() else []


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    r = Runner(tmp_path_factory.mktemp("readme_commands"))
    yield r
    r.close()


def line_id(index: int, line: str) -> str:
    """'03 generate "Why is the..." --json > run.json': the number keeps ids unique, long prompts shortened."""
    words = [f'"{t[:12]}..."' if " " in t and len(t) > 12 else t for t in shlex.split(line, comments=True)[1:]]
    return f"{index:02d} " + " ".join(words)


def check_json_stdout(res: Result) -> dict:
    text = res.stdout.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        # eval prints progress lines first and the summary as the last line
        last = text.splitlines()[-1] if text else ""
        try:
            return json.loads(last)
        except json.JSONDecodeError:
            pytest.fail(f"`{res.cmd.line}`: --json output is not JSON: {text[-500:]!r}")


def check_outputs(res: Result, cwd: Path) -> None:
    cmd = res.cmd
    # A command's result is on stdout unless it writes files (-o/--out), where stdout may stay
    # empty (plot and calibrate report on stderr); files are checked below.
    if "--json" in cmd.argv or cmd.stdout_file or not any(flag in cmd.argv for flag in OUTPUT_FLAGS):
        where = f" (into {cmd.stdout_file})" if cmd.stdout_file else ""
        assert res.stdout.strip(), f"`{cmd.line}` printed nothing on stdout{where}; stderr tail:\n{res.stderr[-1000:]}"

    if "--json" in cmd.argv:
        obj = check_json_stdout(res)
        assert isinstance(obj, dict) and obj, f"`{cmd.line}`: --json printed {obj!r}"
        if cmd.sub == "generate":
            assert isinstance(obj.get("text"), str) and obj["text"].strip(), f"no generated text in {list(obj)}"
            assert obj.get("tokens"), f"no tokens in the --json object: {list(obj)}"
        if cmd.sub == "eval":
            assert obj.get("n") == int(cmd.option("--limit")), f"eval summary counts {obj.get('n')} problems: {obj}"
            assert 0.0 <= obj["accuracy"] <= 1.0
    elif cmd.sub == "generate":
        # streamed text; the run's statistics go to stderr
        assert not res.stdout.lstrip().startswith("{")

    for name in cmd.outputs():
        path = cwd / name
        if cmd.sub == "export":  # a Hugging Face folder: tests/test_export.py loads such folders back
            found = {p.name for p in path.iterdir()} if path.is_dir() else set()
            assert {"config.json", "tokenizer.json"} <= found and any(f.endswith(".safetensors") for f in found), found
            continue
        assert path.is_file() and path.stat().st_size > 0, f"`{cmd.line}` did not write {name}"
        data = path.read_bytes()
        if path.suffix == ".png":
            assert data.startswith(PNG_MAGIC), f"{name} is not a PNG"
        elif path.suffix == ".json":
            obj = json.loads(data)
            assert isinstance(obj, dict) and obj, f"{name} holds {obj!r}"
        elif path.suffix == ".jsonl":
            rows = [json.loads(ln) for ln in data.decode().splitlines() if ln.strip()]
            if cmd.sub == "eval":
                assert len(rows) == int(cmd.option("--limit")), f"{name} has {len(rows)} rows"
                assert all(r["task"] == cmd.option("--task") for r in rows)
        elif path.suffix == ".md" and cmd.sub == "eval-report":
            # the report covers every task found in the results files it was given
            text = data.decode()
            tasks = {json.loads(ln)["task"] for f in cmd.inputs() for p in glob.glob(f, root_dir=cwd)
                     for ln in (cwd / p).read_text().splitlines() if ln.strip()}
            assert tasks and all(t in text for t in tasks), f"{name} does not mention the tasks {tasks}"


def check_calibration_prompts(res: Result, cwd: Path) -> None:
    """The adapted line calibrated on the head of the shipped prompt set, which the line as typed
    reads whole."""
    from entropix.evaluate.calibrate import load_prompts

    shipped, used = load_prompts(), load_prompts(cwd / res.cmd.option("--prompts"))
    assert used == shipped[:CALIBRATION_COUNT] and len(shipped) > CALIBRATION_COUNT, (len(shipped), used)
    profile = json.loads((cwd / res.cmd.option("--out", "-o")).read_text())
    assert profile["_calibration"]["prompts"] == len(used), profile["_calibration"]


def xdist_groups() -> list[str]:
    """One pytest-xdist group for all the lines: they share one driver process (its imports and its
    model), and some share files (`plot run.json` reads what `generate ... > run.json` wrote)."""
    return ["readme"] * len(LINES)


@pytest.mark.parametrize("index", [pytest.param(i, marks=pytest.mark.xdist_group(g)) for i, g in enumerate(xdist_groups())],
                         ids=[line_id(i, ln) for i, ln in enumerate(LINES)])
def test_readme_command_line(index, runner):
    cmd = parse(LINES[index])
    reason = skip_reason(cmd)
    if reason:
        pytest.skip(f"`{cmd.line.split('  #')[0].strip()}`: {reason}")
    res = runner.run(index)
    assert res.returncode == 0, res.why()
    # bash's reading of the line (quotes, globs, `> FILE`) gave the CLI the flags read here
    assert res.ran == [arg for tok in cmd.argv for arg in expand(tok, runner.cwd)], res.why()
    check_outputs(res, runner.cwd)
    if cmd.sub == "calibrate":
        check_calibration_prompts(res, runner.cwd)
