"""Every line of the README's "Command line" block runs, as typed, under the defaults users get.

The lines are parsed from README.md (not copied here), so the README cannot drift from what
works. Each runs as a subprocess of the installed `entropix` script on the embedded model,
with no --quant/--dtype flag and no ENTROPIX_* variable: the default weight mode is what a
user gets. The only adaptations are small --max-tokens / --limit (bench: --tokens,
--repeats, --prompt-tokens; --no-transformers, or --no-rss with --peer) so the file stays quick, and a temporary working folder so that
output files land there. Lines run in README order in one shared folder, so `plot run.json`
reads what `generate ... --json > run.json` wrote; a line run alone (-k) first runs the lines
that produce its input files.
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
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end to end on the embedded model (make test-fast leaves it out)

README = Path(__file__).resolve().parents[1] / "README.md"

MAX_TOKENS = 6  # generate / calibrate / eval: enough to exercise each sampler's decode loop
LIMIT = 1  # eval: problems per run
# bench: one short run instead of 3 x 128 tokens after a 64-token prompt
BENCH = {"--tokens": "4", "--repeats": "1", "--prompt-tokens": "16"}
# transformers takes ~20 s to read the GGUF: `bench` skips its baseline (`bench --peer` still runs
# it), and `--peer` skips the peak-RSS processes, one per contender, each loading its model again
# (tests/test_quant.py times transformers and measures the processes on a tiny checkpoint)
BENCH_ONLY_OURS = ("--no-transformers",)
BENCH_PEER = ("--no-rss",)
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


def _set(argv: list[str], flag: str, value: str) -> None:
    """Override FLAG's value, or append it."""
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]


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
    argv = tokens[1:]
    sub = argv[0]
    if sub in ("generate", "calibrate", "eval"):
        _set(argv, "--max-tokens", str(MAX_TOKENS))
    if sub == "eval":
        _set(argv, "--limit", str(LIMIT))
    if sub == "bench":
        for flag, value in BENCH.items():
            _set(argv, flag, value)
        argv += [f for f in (BENCH_PEER if "--peer" in argv else BENCH_ONLY_OURS) if f not in argv]
    return Command(line, argv, stdout_file)


def skip_reason(cmd: Command) -> str | None:
    if cmd.sub == "download":
        return "needs a network"
    if cmd.sub == "serve":
        return "a long-running server: tests/test_server.py and tests/test_serve_concurrent.py start it"
    if cmd.sub == "chat":
        return "interactive: tests/test_cli.py::test_chat_multi_turn_over_stdin drives it over stdin"
    if "llama.cpp" in cmd.argv:  # --peer llama.cpp / --engine llama.cpp need the optional engine
        try:
            importlib.import_module("llama_cpp")
        except ImportError as e:
            return f"llama.cpp is an optional engine and llama_cpp cannot be imported here ({e})"
    return None


def entropix_exe() -> list[str]:
    script = Path(sys.executable).parent / ("entropix.exe" if os.name == "nt" else "entropix")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "entropix.cli"]


def default_env() -> dict[str, str]:
    # No ENTROPIX_* variable may reach the command: it runs the defaults a user gets
    # (ENTROPIX_QUANT would change the weight mode, ENTROPIX_API_KEY the server's auth, ...).
    return {k: v for k, v in os.environ.items() if not k.startswith("ENTROPIX_")}


@dataclass
class Result:
    cmd: Command
    returncode: int
    stdout: str
    stderr: str

    def why(self) -> str:
        return f"`{self.cmd.line}` ran as {self.cmd.argv}, exit {self.returncode}; stderr tail:\n{self.stderr[-2000:]}"


class Runner:
    """Runs README lines in one folder, each at most once, producers before consumers."""

    def __init__(self, cwd: Path):
        self.cwd = cwd
        self.results: dict[int, Result] = {}

    def run(self, index: int) -> Result:
        if index in self.results:
            return self.results[index]
        cmd = parse(LINES[index])
        for j in self.producers(index):
            dep = self.run(j)
            assert dep.returncode == 0, f"input of `{cmd.line}` comes from `{dep.cmd.line}`, which failed: {dep.why()}"
        argv = [arg for tok in cmd.argv for arg in self.expand(tok)]
        out_file = open(self.cwd / cmd.stdout_file, "w") if cmd.stdout_file else subprocess.PIPE
        try:
            proc = subprocess.run(entropix_exe() + argv, cwd=self.cwd, env=default_env(), stdin=subprocess.DEVNULL,
                                  stdout=out_file, stderr=subprocess.PIPE, text=True, timeout=TIMEOUT)
        finally:
            if cmd.stdout_file:
                out_file.close()
        stdout = (self.cwd / cmd.stdout_file).read_text() if cmd.stdout_file else proc.stdout
        result = self.results[index] = Result(cmd, proc.returncode, stdout, proc.stderr)
        return result

    def producers(self, index: int) -> list[int]:
        """Earlier runnable lines that write a file this line reads."""
        wanted = parse(LINES[index]).inputs()
        found = []
        for j in range(index):
            earlier = parse(LINES[j])
            if skip_reason(earlier) is None and any(fnmatch.fnmatch(o, w) for o in earlier.outputs() for w in wanted):
                found.append(j)
        return found

    def expand(self, tok: str) -> list[str]:
        # The shell expands globs (results/*.jsonl) in the working folder; an unmatched glob
        # stays as typed, as in bash, and the command then reports the missing file.
        if glob.has_magic(tok):
            return sorted(glob.glob(tok, root_dir=self.cwd)) or [tok]
        return [tok]


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    return Runner(tmp_path_factory.mktemp("readme_commands"))


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


def xdist_groups() -> list[str]:
    """One pytest-xdist group per set of lines tied by the files they share (`plot run.json` with
    the `generate ... > run.json` line before it): such lines run in one process, in README order,
    so that no line runs twice; the other lines spread over the workers."""
    root = list(range(len(LINES)))

    def find(i: int) -> int:
        while root[i] != i:
            i = root[i]
        return i

    runner = Runner(Path("."))
    for i in range(len(LINES)):
        if skip_reason(parse(LINES[i])) is None:
            for j in runner.producers(i):
                root[find(i)] = find(j)
    return [f"readme-{find(i):02d}" for i in range(len(LINES))]


@pytest.mark.parametrize("index", [pytest.param(i, marks=pytest.mark.xdist_group(g)) for i, g in enumerate(xdist_groups())],
                         ids=[line_id(i, ln) for i, ln in enumerate(LINES)])
def test_readme_command_line(index, runner):
    cmd = parse(LINES[index])
    reason = skip_reason(cmd)
    if reason:
        pytest.skip(f"`{cmd.line.split('  #')[0].strip()}`: {reason}")
    res = runner.run(index)
    assert res.returncode == 0, res.why()
    check_outputs(res, runner.cwd)
