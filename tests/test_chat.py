"""``alignez chat`` as users run it: the real command in a subprocess (piped stdin, --prompt, --json)
and in a pseudo-terminal (interactive input, Ctrl-C, Ctrl-D), on the tiny model and SmolLM2; plus
``ChatSession`` in-process for what a subprocess cannot time (an interrupt at a chosen token)."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFWriter

from alignez_local.apps.chat import ChatSession
from alignez_local.formats.control_vector import ControlVector, write_control_vector
from alignez_local.llama.engine import Engine, Sampling
from alignez_local.errors import AlignezError
from alignez_local.align.steering import ProfileSlot, Steering, VectorSlot
from alignez_local.formats.profile import SteeringProfile
from alignez_local.testing import write_tiny_llama

REPO = Path(__file__).resolve().parents[1]
# cli.py has no __main__ block; this runs its click group exactly as the console script does.
CLI = [sys.executable, "-c", "from alignez_local.apps.cli import main; main()", "chat", "--threads", "1"]
# One thread: on a busy machine llama.cpp's spinning worker threads make tiny decodes 1000x slower.
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8", "PYTHONUNBUFFERED": "1"}
QUESTION = "What is the capital of France?"


def run_chat(*args: Any, stdin: str = "", timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Return the finished ``alignez chat`` run; stdin is always a pipe, never the test's terminal."""
    return subprocess.run(
        [*CLI, *map(str, args)], input=stdin, capture_output=True, text=True, encoding="utf-8",
        errors="replace", timeout=timeout, env=ENV, cwd=REPO,
    )


def json_lines(out: str) -> list[dict[str, Any]]:
    """Return every stdout line parsed as JSON (each line must be one object)."""
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def assert_one_error_line(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in lines[0]


def random_vector(n_embd: int, layer: int, norm: float, seed: int, **kw: Any) -> ControlVector:
    v = np.random.default_rng(seed).standard_normal(n_embd).astype(np.float32)
    return ControlVector({layer: v * np.float32(norm / np.linalg.norm(v))}, **kw)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path) -> dict[str, Path]:
    """Return control vector files for both models, good and bad."""
    d = tmp_path_factory.mktemp("vectors")
    out = {
        # A random direction this large moves any model: what it changes does not matter here.
        "tiny": write_control_vector(d / "tinyv.gguf", random_vector(64, 2, 20, 1, model_hint="llama")),
        "smollm": write_control_vector(d / "smolv.gguf", random_vector(576, 15, 20, 2, model_hint="llama")),
        "narrow": write_control_vector(d / "narrow.gguf", random_vector(32, 2, 1, 3)),
        "layer40": write_control_vector(d / "layer40.gguf", random_vector(64, 40, 1, 4)),
        "gemma_hint": write_control_vector(d / "gemmahint.gguf", random_vector(64, 1, 1, 5, model_hint="gemma3")),
        "model": tiny_model_path,
    }
    (d / "notes.gguf").write_text("these are notes, not a vector\n")
    out["text"] = d / "notes.gguf"
    # llama.cpp's cvector-generator: every layer 1..n_layer-1, int32 layer_count.
    out["cvgen"] = _foreign(d / "cvgen.gguf", {L: random_vector(64, L, 5, 10 + L).directions[L] for L in (1, 2, 3)},
                            lambda w: w.add_int32("controlvector.layer_count", 3))
    # repeng's export_gguf: some layers, uint32 layer_count.
    out["repeng"] = _foreign(d / "repeng.gguf", {2: random_vector(64, 2, 5, 20).directions[2]},
                             lambda w: w.add_uint32("controlvector.layer_count", 1))
    return out


def _foreign(path: Path, directions: dict[int, np.ndarray], add_count: Any) -> Path:
    """Return ``path`` after writing a control vector with gguf's own writer, as other tools do."""
    w = GGUFWriter(path, "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    add_count(w)
    for layer, vec in directions.items():
        w.add_tensor(f"direction.{layer}", np.asarray(vec, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def models(tiny_model_path: Path, smollm_path: Path) -> dict[str, Path]:
    return {"tiny": tiny_model_path, "smollm": smollm_path}


# --- subprocess: steering on, off and compared ------------------------------------------------


def test_help_documents_commands_and_seed() -> None:
    proc = run_chat("--help")
    assert proc.returncode == 0
    for word in ("--vector", "--profile", "--layers", "--system", "--prompt", "--json", "/compare", "/off", "--seed"):
        assert word in proc.stdout
    assert "exactly the unsteered answer" in " ".join(proc.stdout.split())


@pytest.mark.parametrize("which", ["tiny", pytest.param("smollm", marks=pytest.mark.smollm)])
def test_off_and_compare_reproduce_the_unsteered_answer(which: str, models: dict[str, Path], files: dict[str, Path]) -> None:
    model, vec = models[which], files[which]
    # Sampled (temperature 0.7, the chat default): only the shared seed makes answers repeatable.
    common = ("-m", model, "--max-tokens", 24, "--json")
    [plain] = json_lines(run_chat(*common, "--prompt", QUESTION).stdout)
    proc = run_chat(*common, "--vector", vec, stdin=f"{QUESTION}\n/off\n/reset\n{QUESTION}\n/on\n/compare\n")
    assert proc.returncode == 0, proc.stderr
    steered, unsteered, cmp_off, cmp_on = json_lines(proc.stdout)
    assert plain["steered"] is False and plain["answer"]
    assert steered["steered"] is True and unsteered["steered"] is False
    assert steered["answer"] != plain["answer"], "the vector must change the answer"
    assert unsteered["answer"] == plain["answer"], "/off must give exactly the answer of a run without vectors"
    assert (cmp_off["compare"], cmp_off["steered"], cmp_on["steered"]) == (True, False, True)
    assert cmp_off["answer"] == plain["answer"]
    assert cmp_on["answer"] == steered["answer"]
    assert steered["settings"]["steering"]["vectors"][0]["path"] == str(vec.resolve())


def test_compare_prints_both_answers_under_headers(tiny_model_path: Path, files: dict[str, Path]) -> None:
    proc = run_chat("-m", tiny_model_path, "--max-tokens", 12, "--vector", f"{files['tiny']}:1.5",
                    stdin=f"{QUESTION}\n/compare\n")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith(f"> {QUESTION}\n")
    first, _, rest = out.removeprefix(f"> {QUESTION}\n").partition("> /compare\n")
    assert rest.startswith("--- unsteered ---\n")
    unsteered, _, steered = rest.removeprefix("--- unsteered ---\n").partition("--- steered (tinyv x1.5) ---\n")
    assert steered == first, "the steered answer of /compare is the first (steered) answer again"
    assert unsteered.strip() and unsteered != first


def test_compare_without_a_vector_says_so(tiny_model_path: Path) -> None:
    proc = run_chat("-m", tiny_model_path, "--max-tokens", 4, stdin="/compare\nHi\n/compare\n")
    assert proc.returncode == 1
    errors = proc.stderr.strip().splitlines()
    assert errors == [
        "error: nothing to compare yet: ask something first",
        "error: nothing to compare: no vector or profile with a non-zero strength is loaded",
    ]


# --- subprocess: vectors refused or accepted ---------------------------------------------------


@pytest.mark.parametrize(
    "bad, needles",
    [
        ("narrow", ("width 32", "n_embd 64")),
        ("layer40", ("direction.40", "4 layers")),
        ("text", ("not a GGUF file",)),
        ("model", ("model file", "-m")),
    ],
)
def test_bad_vectors_are_refused_with_one_line(bad: str, needles: tuple[str, ...], tiny_model_path: Path, files: dict[str, Path]) -> None:
    proc = run_chat("-m", tiny_model_path, "--vector", files[bad], "--prompt", "Hi")
    assert_one_error_line(proc, *needles)
    assert proc.stdout == ""


def test_other_architecture_warns_on_stderr(tiny_model_path: Path, files: dict[str, Path]) -> None:
    proc = run_chat("-m", tiny_model_path, "--vector", files["gemma_hint"], "--prompt", "Hi", "--max-tokens", 3)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines() == ["warning: vector gemmahint was made for 'gemma3', model is 'llama'"]
    assert proc.stdout.strip()


def test_vectors_from_other_tools_several_at_once_and_live_commands(tiny_model_path: Path, files: dict[str, Path]) -> None:
    script = "\n".join([
        "/vectors",
        "/strength abc",
        "/layers 9-3",
        "/frobnicate",
        "/strength repeng 2.5",
        "/strength 200",
        "/strength nosuch 1",
        "/layers 2-3",
        "/vectors",
        "/layers 1-1",
        "/layers all",
        "/strength -0.5",
        "/off",
        "/vectors",
        "/help",
        "Hi",
        "//not a command",
        "/quit",
        "never read",
    ]) + "\n"
    proc = run_chat("-m", tiny_model_path, "--max-tokens", 4, "--vector", f"{files['cvgen']}:0.5",
                    "--vector", f"{files['repeng']}:-1", stdin=script)
    assert proc.returncode == 1, "a script with failed lines ends with status 1"
    assert "Traceback" not in proc.stderr
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 5 and all(e.startswith("error: ") for e in errors), errors
    assert "'abc' is not a number" in errors[0]
    assert "'9-3' is empty" in errors[1]
    assert errors[2] == "error: unknown command /frobnicate; type /help for the list of commands"
    assert "out of range" in errors[3]
    assert "'nosuch'" in errors[4] and "cvgen, repeng" in errors[4]
    out = proc.stdout
    blocks = out.split("> /vectors\n")
    assert blocks[1].startswith(
        "vector  cvgen: strength 0.5 (given), layers 1-3 (3)\nvector  repeng: strength -1 (given), layers 2-2 (1)\nsteering is on\n"
    )
    assert blocks[2].startswith(
        "vector  cvgen: strength 0.5 (given), layers 1-3 (3)\nvector  repeng: strength 2.5 (set with /strength), layers 2-2 (1)\n"
        "layer range 2-3\nsteering is on\n"
    )
    assert "> /layers 1-1\nsteering layers 1-1\n(no loaded vector or profile has a layer in 1-1" not in out  # cvgen has layer 1
    assert "strength -0.5 for everything" in out
    assert blocks[3].startswith(
        "vector  cvgen: strength -0.5 (set with /strength), layers 1-3 (3)\n"
        "vector  repeng: strength -0.5 (set with /strength), layers 2-2 (1)\nsteering is off\n"
    )
    assert "/compare" in out and "/save FILE" in out  # /help
    assert "> Hi\n" in out and "> //not a command\n" in out
    assert "never read" not in out


# --- subprocess: one-shot, JSON, system prompt, base models, save -------------------------------


def test_prompt_json_output_parses(tiny_model_path: Path) -> None:
    proc = run_chat("-m", tiny_model_path, "--max-tokens", 5, "--seed", 3, "-s", "Be brief.", "--json", "--prompt", "Hi")
    assert proc.returncode == 0, proc.stderr
    [rec] = json_lines(proc.stdout)
    assert set(rec) == {"prompt", "answer", "steered", "finish_reason", "n_tokens", "settings"}
    assert rec["prompt"] == "Hi" and rec["steered"] is False
    assert rec["finish_reason"] in ("stop", "length") and 0 <= rec["n_tokens"] <= 5
    s = rec["settings"]
    assert s["system"] == "Be brief." and s["sampling"]["seed"] == 3 and s["sampling"]["max_tokens"] == 5
    assert s["model"]["path"] == str(tiny_model_path.resolve()) and s["model"]["chat_template"] is True


def test_prompt_text_mode_prints_only_the_answer(tiny_model_path: Path) -> None:
    proc = run_chat("-m", tiny_model_path, "--max-tokens", 5, "--prompt", "Hi")
    assert proc.returncode == 0 and proc.stderr == ""
    [rec] = json_lines(run_chat("-m", tiny_model_path, "--max-tokens", 5, "--prompt", "Hi", "--json").stdout)
    assert proc.stdout == rec["answer"] + "\n"


def test_empty_prompt_and_bad_sampling_fail_with_one_line(tiny_model_path: Path) -> None:
    assert_one_error_line(run_chat("-m", tiny_model_path, "--prompt", "  "), "--prompt is empty")
    assert_one_error_line(run_chat("-m", tiny_model_path, "--prompt", "Hi", "--temperature", "9"), "--temperature")
    assert_one_error_line(run_chat("-m", tiny_model_path, "--prompt", "Hi", "--layers", "2-9"), "past the model's last layer")


def test_base_model_gets_plain_format_and_stop_strings(tmp_path: Path) -> None:
    base = write_tiny_llama(tmp_path / "base.gguf", chat_template=None)
    proc = run_chat("-m", base, "--max-tokens", 6, "--json", stdin="Hi\nAnd you?\n")
    assert proc.returncode == 0, proc.stderr
    first, second = json_lines(proc.stdout)
    assert first["settings"]["model"]["chat_template"] is False
    assert first["settings"]["sampling"]["stop"] == ["\nUser:", "\nQuestion:"]
    assert "User:" not in first["answer"] and second["prompt"] == "And you?"


def test_save_writes_the_conversation_and_every_setting(tiny_model_path: Path, files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "chat.json"
    script = f"Hello\nAnd again\n/strength 2\n/layers 2-3\n/save {tmp_path / 'no' / 'such' / 'dir.json'}\n/save {out}\n"
    proc = run_chat("-m", tiny_model_path, "--max-tokens", 6, "--seed", 7, "-s", "You are terse.", "--json",
                    "--vector", f"{files['tiny']}:1.5", stdin=script)
    assert proc.returncode == 1  # the save into a missing folder failed
    # In --json mode command output goes to stderr too, so stdout is nothing but JSON answers.
    err = proc.stderr.strip().splitlines()
    assert err[:2] == ["strength 2 for everything", "steering layers 2-3"]
    assert err[2].startswith("error: cannot write") and "does not exist" in err[2]
    assert err[3] == f"saved 2 turn(s) and the settings to {out}"
    first, second = json_lines(proc.stdout)
    saved = json.loads(out.read_text())
    assert saved["format"] == "alignez-chat" and saved["version"] == 2
    assert saved["model"]["path"] == str(tiny_model_path.resolve())
    assert saved["sampling"]["seed"] == 7 and saved["sampling"]["max_tokens"] == 6
    assert saved["system"] == "You are terse."
    st = saved["steering"]
    assert st["enabled"] is True and st["layers"] == "2-3"
    assert st["vectors"] == [{"name": "tinyv", "path": str(files["tiny"].resolve()), "strength": 2.0,
                              "strength_from": "set with /strength", "layers": [2]}]
    assert saved["messages"] == [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": first["answer"]},
        {"role": "user", "content": "And again"},
        {"role": "assistant", "content": second["answer"]},
    ]
    assert not list(tmp_path.glob(".chat.json.*"))  # the atomic write left no temporary file


# --- in-process: history, context, interrupts --------------------------------------------------


@pytest.fixture(scope="module")
def small_ctx_engine(tiny_model_path: Path) -> Engine:
    return Engine(tiny_model_path, n_ctx=256, n_threads=1)


def test_history_is_rendered_whole_and_trimmed_to_fit(small_ctx_engine: Engine) -> None:
    notes: list[str] = []
    s = ChatSession(small_ctx_engine, sampling=Sampling(max_tokens=40, temperature=0.7), system="sys", on_note=notes.append)
    for i in range(12):
        s.messages += [{"role": "user", "content": f"question {i} " * 4}, {"role": "assistant", "content": "answer " * 6}]
    ans = s.ask("last one")
    assert ans.finish_reason in ("stop", "length") and notes and "oldest turn" in notes[0]
    assert s.messages[-2:] == [{"role": "user", "content": "last one"}, {"role": "assistant", "content": ans.text}]
    assert len(s.messages) == 26, "trimming shortens the prompt, never the saved history"
    with pytest.raises(AlignezError, match="empty message"):
        s.ask("   ")


def test_interrupt_keeps_history_clean_and_engine_unsteered(small_ctx_engine: Engine) -> None:
    e = small_ctx_engine
    vec = random_vector(e.n_embd, 2, 20, 1)
    s = ChatSession(e, Steering(vectors=[VectorSlot("v", vec, 1.0)]), Sampling(max_tokens=20, temperature=0.7))
    baseline = s.ask("Hi", steered=False)
    s.reset()
    seen: list[str] = []

    def stop_after_three(piece: str) -> None:
        seen.append(piece)
        if len(seen) == 3:
            raise KeyboardInterrupt  # what Ctrl-C does inside the decode loop

    ans = s.ask("Hi", on_token=stop_after_three)
    assert ans.finish_reason == "interrupted" and ans.steered is True
    assert ans.text == "".join(seen) and s.messages == []
    assert s.last_turn is not None  # /compare can still answer the interrupted question
    again = s.ask("Hi", steered=False)
    assert again.text == baseline.text, "after an interrupt under steering the engine must be unsteered again"
    assert [a.text for a in s.compare()][0] == baseline.text


def test_sigint_while_answering_stops_the_answer(small_ctx_engine: Engine) -> None:
    s = ChatSession(small_ctx_engine, sampling=Sampling(max_tokens=40, temperature=0.7))
    seen: list[str] = []

    def press_ctrl_c(piece: str) -> None:
        seen.append(piece)
        if len(seen) == 2:
            os.kill(os.getpid(), signal.SIGINT)

    # Whatever handler was there before the answer (a background job starts with SIGINT ignored) is back after it.
    before = signal.getsignal(signal.SIGINT)
    ans = s.ask("Hi", on_token=press_ctrl_c)
    assert ans.finish_reason == "interrupted" and len(seen) <= 3 and s.messages == []
    assert signal.getsignal(signal.SIGINT) is before, "the usual Ctrl-C is back after the answer"
    assert s.ask("Hi").finish_reason in ("stop", "length")


def test_handle_command_results(small_ctx_engine: Engine) -> None:
    s = ChatSession(small_ctx_engine)
    assert s.handle_command("/quit").action == "quit"
    assert s.handle_command("/compare").action == "compare"
    assert s.handle_command("/STRENGTH 2").error.startswith("no vector or profile is loaded")
    assert s.handle_command("/layers 1-2").lines == ["steering layers 1-2"]
    assert s.handle_command("/layers").lines == ["steering layers 1-2"]
    assert s.handle_command("/layers all").lines == ["steering every layer"]
    assert s.handle_command("/save").error.startswith("/save needs a file name")
    assert s.describe()[0] == "no vector or profile loaded"


def test_strength_command_treats_vectors_and_profiles_alike(small_ctx_engine: Engine) -> None:
    e = small_ctx_engine
    theta = np.zeros((1, 64), np.float32)
    theta[0, 0] = 1.0
    prof = SteeringProfile(subspaces={2: theta}, site="ffn_out", method="svd",
                           axis={"name": "a", "positive": "p", "negative": "n"}, layer_stats={}, params={},
                           provenance={"n_embd": 64, "n_layer": 4}, default_strength=0.5)
    st = Steering(vectors=[VectorSlot("v", random_vector(64, 2, 5, 0))], profiles=[ProfileSlot("p", prof, 0.5, "file default")])
    s = ChatSession(e, st)
    assert s.describe()[1].startswith("profile p: strength 0.5 (file default), svd on ffn_out")
    assert s.handle_command("/strength p 2").lines == ["strength 2 for p"]
    assert s.handle_command("/strength -1").lines == ["strength -1 for everything"]
    assert [(x.strength, x.origin) for x in st.slots] == [(-1.0, "set with /strength")] * 2
    profiles = s.settings()["steering"]["profiles"]
    assert profiles[0]["strength"] == -1.0 and profiles[0]["strength_from"] == "set with /strength" and "weight" not in profiles[0]
    assert "/strength" in s.handle_command("/strength 1e9").error


# --- pseudo-terminal: the interactive path ------------------------------------------------------


class Terminal:
    """The chat command on a pseudo-terminal, read and written like a user would."""

    def __init__(self, *args: Any) -> None:
        env = {**ENV, "TERM": "dumb"}  # no colour or cursor escapes from readline
        pid, fd = pty.fork()
        if pid == 0:  # the child: become the chat command
            try:
                os.chdir(REPO)
                # A user's terminal program starts with the default Ctrl-C; a test run launched as a
                # background job (nohup, CI runners) would hand its ignored SIGINT down instead.
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.execve(sys.executable, [*CLI, *map(str, args)], env)
            finally:
                os._exit(127)
        self.pid, self.fd, self.buf, self.pos = pid, fd, b"", 0

    def read_some(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.buf += data
        return bool(data)

    def expect(self, text: bytes, timeout: float = 120) -> bytes:
        """Return the output up to and including ``text`` (after the last match), waiting for it."""
        end = time.monotonic() + timeout
        while (i := self.buf.find(text, self.pos)) < 0:
            if time.monotonic() > end or not self.read_some(0.2):
                raise AssertionError(f"{text!r} not seen; output was:\n{self.buf.decode(errors='replace')}")
        seen, self.pos = self.buf[self.pos : i + len(text)], i + len(text)
        return seen

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, timeout: float = 60) -> int:
        """Return the exit status of the command, reading its output while it ends."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            self.read_some(0.1)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"the chat did not exit; output was:\n{self.buf.decode(errors='replace')}")


@pytest.mark.smollm
def test_ctrl_c_stops_a_long_answer_and_quit_exits_0(smollm_path: Path, tmp_path: Path) -> None:
    t = Terminal("-m", smollm_path, "--max-tokens", 2000)
    t.expect(b"Ctrl-D or /quit leaves.")
    t.expect(b"> ")
    t.send(b"Write a very long story about a dragon who learns to cook.\r")
    t.expect(b"learns to cook.\r\n")
    start = t.pos
    while len(t.buf[start:].strip()) < 20:  # the answer is streaming
        assert t.read_some(60), t.buf.decode(errors="replace")
    t.send(b"\x03")
    answer = t.expect(b"[stopped]", timeout=60)
    assert len(answer) < 4000, "Ctrl-C must stop the answer long before 2000 tokens"
    t.expect(b"> ")
    t.send(f"/save {tmp_path / 'after.json'}\r".encode())
    t.expect(b"saved 0 turn(s)")  # the stopped answer stayed out of the history
    t.expect(b"> ")
    t.send(b"/quit\r")
    assert t.wait() == 0
    assert b"Traceback" not in t.buf
    assert json.loads((tmp_path / "after.json").read_text())["messages"] == []


def test_interactive_chat_streams_and_ctrl_d_exits_0(tiny_model_path: Path, files: dict[str, Path]) -> None:
    t = Terminal("-m", tiny_model_path, "--max-tokens", 6, "--vector", f"{files['tiny']}:2")
    banner = t.expect(b"> ")
    assert b"vector  tinyv: strength 2 (given), layers 2-2 (1)" in banner and b"steering is on" in banner
    # CPython's readline loop only notices a signal that lands while it waits in select(): give
    # it a moment to get there after printing the prompt (a person is never that fast).
    time.sleep(0.5)
    t.send(b"\x03")  # Ctrl-C at the prompt does not leave
    t.expect(b"(Ctrl-D or /quit leaves)")
    t.expect(b"> ")
    t.send(b"Hello\r")
    t.expect(b"Hello\r\n")
    answer = t.expect(b"> ")
    assert answer.strip(b"> \r\n")
    t.send(b"/off\r")
    t.expect(b"steering off")
    t.expect(b"> ")
    t.send(b"/oops\r")
    t.expect(b"error: unknown command /oops; type /help")
    t.expect(b"> ")
    t.send(b"\x04")  # Ctrl-D
    assert t.wait() == 0
    assert b"Traceback" not in t.buf
