"""The text stages of ``steer`` on OpenAI-compatible servers (``--generate-url``): the screen, the
preference pairs and the calibration bench's unsteered and prompting answers, which need only
text. The capture, the fit and every steered answer stay local: they need the model's internals.

``RemoteWriter.generate`` has ``Engine.generate``'s shape, so ``preferences.py`` and the
``BehaviourBench`` take either. Each prompt is one ``POST {URL}/v1/completions`` with the exact
prompt text the local path formats (the model's chat template already applied, control tokens
as text the server reads as control tokens, as llama-server and ``alignez serve`` do for a raw
prompt) and the local sampling: max tokens, stop strings, temperature, top-k, top-p, seed and
repeat penalty (llama.cpp's names; ``min_p`` 0 and ``typical_p`` 1 turn off llama-server's other
default samplers). Greedy answers are then those of the local path, but for two things:

- llama.cpp's sums depend on the batch shapes, so at a near tie a server decoding other requests
  beside it may pick another token (as two local runs with other ``--parallel`` may);
- llama-server puts the prompt's tokens in its repeat-penalty window (its last 64 tokens), the
  local path and ``alignez serve`` only the answer's: with ``repeat_penalty`` 1.1 (steer's) an
  answer that repeats a word of the prompt's end can differ there.

A seed gives the same sampler chain on llama-server, so sampled answers may match too; nothing else
promises that. Transport (fan-out, retries, timeouts, one-line errors, the key from
``ALIGNEZ_GENERATE_API_KEY`` or ``OPENAI_API_KEY``) is ``remote_api.py``'s, shared with the judge.

The server must serve the local model (``check_model``): its /v1/models metadata (vocabulary size
and width on llama-server and ``alignez serve``), its /tokenize of a probe prompt (llama-server;
vLLM's field names are sent too, not tried here) and the token count it reports for the same prompt
are compared with the local file; any that differ refuse the run in one line, and a server that
offers none of them is named in one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from alignez_local.errors import AlignezError
from alignez_local.llama.engine import Completion, Engine, Sampling
from alignez_local.remote_api import DEFAULT_CONCURRENCY, DEFAULT_RETRIES, Role, Servers

KEY_ENVS = ("ALIGNEZ_GENERATE_API_KEY", "OPENAI_API_KEY")
"""Where the API key is read from, first set wins."""
ROLE = Role("generation", "--generate", KEY_ENVS)
DEFAULT_TIMEOUT = 300.0  # a 48-token answer on a busy CPU server with 4 requests in flight takes tens of seconds
REPEAT_LAST_N = 64  # the local penalty window (llama/sampling.py)

# Mixed scripts, digits, code and emoji under the chat template: tokenizers of different models
# (or a server reading control-token text as plain text) split it differently.
PROBE_USER = "Réponds en français : quelle heure est-il à 東京 ? 🙂 def f(x):\n    return x**2 + 12345"
PROBE_SYSTEM = "You are a helpful assistant."


class RemoteWriter:
    """Answers from OpenAI-compatible servers serving the local model, in ``Engine.generate``'s shape."""

    def __init__(self, urls: Sequence[str], model: str | None = None, concurrency: int = DEFAULT_CONCURRENCY,
                 timeout: float = DEFAULT_TIMEOUT, retries: int = DEFAULT_RETRIES) -> None:
        """Return the writer (AlignezError for a bad URL or setting, or a missing httpx; nothing is sent yet)."""
        self.servers = Servers(urls, ROLE, concurrency, timeout, retries)
        self.model = model.strip() if model and model.strip() else None
        self.names: dict[str, str | None] = dict.fromkeys(self.servers.urls, self.model)  # model name per server
        self.checks: dict[str, str] = {}  # per server: what check_model compared

    @property
    def urls(self) -> list[str]:
        return self.servers.urls

    @property
    def n_parallel(self) -> int:
        """Requests in flight over all servers: the chunk a caller should hand over at once."""
        return self.servers.concurrency * len(self.servers.urls)

    # --- the model check ---------------------------------------------------------------------

    def check_model(self, engine: Engine, name: str) -> list[str]:
        """Return one line per server saying what was checked (or that nothing could be), after
        checking each serves the model of ``engine`` (AlignezError, one line, when one clearly does not).
        ``name``: what the local model is called in the lines."""
        probe = engine.prompt(PROBE_USER, PROBE_SYSTEM)
        ours = engine.tokenize(probe, add_bos=False, special=True)
        n_prompt = len(engine.tokenize(probe))  # what a generation reads: BOS too when the model wants it
        lines = []
        for url in self.urls:
            checked: list[str] = []
            card = self._card(url)
            if card is not None:
                if self.names[url] is None and isinstance(card.get("id"), str):
                    self.names[url] = card["id"]
                meta = card.get("meta") if isinstance(card.get("meta"), dict) else {}
                for key, what, local in (("n_vocab", "vocabulary", engine.n_vocab), ("n_embd", "width", engine.n_embd),
                                         ("n_layer", "layers", engine.n_layer)):
                    theirs = meta.get(key)
                    if isinstance(theirs, int) and not isinstance(theirs, bool):
                        if theirs != local:
                            raise AlignezError(self._other(url, name, f"{what} {theirs} there, {local} here"))
                        checked.append(f"{what} {local}")
            # llama-server's fields, and vLLM's (prompt, add_special_tokens): each ignores the other's.
            tokens = self.servers.call(url, "POST", "/tokenize", {"content": probe, "add_special": False, "parse_special": True,
                                                                  "prompt": probe, "add_special_tokens": False})
            theirs_tokens = tokens.get("tokens") if isinstance(tokens, dict) else None
            if isinstance(theirs_tokens, list) and all(isinstance(t, int) for t in theirs_tokens):
                if theirs_tokens != ours:
                    raise AlignezError(self._other(url, name, f"a probe prompt is {len(theirs_tokens)} tokens there, "
                                                              f"{len(ours)} here" if len(theirs_tokens) != len(ours) else
                                                              "a probe prompt gives other token ids there"))
                checked.append(f"the {len(ours)} token ids of a probe prompt")
            # Always one short completion: it finds a server with no raw completions (or refusing
            # the model name) before any work, and its token count is a check any server gives.
            [done] = self._decode(url, [probe], [Sampling(max_tokens=1)])
            if done.n_prompt_tokens:
                if done.n_prompt_tokens != n_prompt:
                    raise AlignezError(self._other(url, name, f"it reads a probe prompt as {done.n_prompt_tokens} tokens, "
                                                              f"the local model as {n_prompt}"))
                checked.append("its prompt token count")
            if card is not None and card.get("owned_by") == "llamacpp":
                lines.append(f"note: {ROLE.server(url)} is llama-server, which counts the prompt in its repeat-penalty "
                             "window (the local path counts only the answer): answers under a repeat penalty can differ")
            self.checks[url] = ", ".join(checked) or "nothing"
            if checked:
                lines.append(f"{ROLE.server(url)} serves {name}: the same {', '.join(checked)}")
            else:
                lines.append(f"warning: cannot check that {ROLE.server(url)} serves {name}: it lists no vocabulary size, "
                             "has no /tokenize and reports no token counts; start it on the same GGUF file")
        return lines

    def _card(self, url: str) -> dict[str, Any] | None:
        """Return the server's first /v1/models entry (None when it has no such route or lists none)."""
        listing = self.servers.call(url, "GET", "/v1/models")
        data = listing.get("data") if isinstance(listing, dict) else None
        if isinstance(data, list) and data and isinstance(data[0], dict):
            return data[0]
        return None

    @staticmethod
    def _other(url: str, name: str, why: str) -> str:
        return (f"{ROLE.server(url)} serves another model than {name} ({why}); start it on the same GGUF file, "
                "e.g. llama-server -m MODEL.gguf")

    # --- generation --------------------------------------------------------------------------

    def body(self, url: str, prompt: str, sp: Sampling) -> dict[str, Any]:
        """Return the raw completion request of one prompt, sampled as ``sp`` samples locally."""
        body: dict[str, Any] = {
            "prompt": prompt, "max_tokens": sp.max_tokens, "temperature": sp.temperature, "top_p": sp.top_p,
            "top_k": sp.top_k, "seed": sp.seed, "repeat_penalty": sp.repeat_penalty, "repeat_last_n": REPEAT_LAST_N,
            "min_p": 0.0, "typical_p": 1.0, "stream": False,
        }
        if sp.stop:
            body["stop"] = list(sp.stop)
        if self.names[url]:
            body["model"] = self.names[url]
        return body

    def generate(self, prompts: Sequence[str], sampling: Sampling | Sequence[Sampling] = Sampling(),
                 share_prefix: bool = False) -> list[Completion]:
        """Return one completion per prompt (``Engine.generate``'s shape; ``share_prefix`` is the
        servers' business: llama-server and ``alignez serve`` reuse cached prompt heads themselves).
        A completion carries no token log-probabilities: readers read its text back locally."""
        sps = [sampling] * len(prompts) if isinstance(sampling, Sampling) else list(sampling)
        if len(sps) != len(prompts):
            raise ValueError("one Sampling per prompt, or a single one for all")
        return self._decode(None, list(prompts), [sp.check() for sp in sps])

    def _decode(self, url: str | None, prompts: list[str], sps: list[Sampling]) -> list[Completion]:
        """Return the completions, from every server (``url`` None) or from one."""
        out: list[Completion | None] = [None] * len(prompts)

        def keep(i: int, c: Completion) -> None:
            out[i] = c

        servers = self.servers if url is None else _One(self.servers, url)
        servers.fan_out("/v1/completions", lambda u, i: self.body(u, prompts[i], sps[i]), len(prompts), _completion, keep)
        return [c for c in out if c is not None]

    def describe(self) -> dict[str, Any]:
        """Return the servers, model names, checks and request counts (never the API key)."""
        return {"urls": self.urls, "model": self.names, "checked": self.checks,
                "api": "POST /v1/completions, the local prompt text and sampling",
                "requests_per_url": self.servers.requests_per_url}


class _One:
    """One server of a ``Servers``: the model check asks each server itself."""

    def __init__(self, servers: Servers, url: str) -> None:
        self.servers, self.url = servers, url

    def fan_out(self, *args: Any) -> None:
        sub = Servers([self.url], self.servers.role, 1, self.servers.timeout, self.servers.retries)
        sub.fan_out(*args)


def _completion(reply: Any, url: str) -> Completion:
    """Return the Completion of a /v1/completions reply (AlignezError when it is not one)."""
    try:
        choice = reply["choices"][0]
        text = choice["text"]
        if not isinstance(text, str):
            raise TypeError
    except (KeyError, IndexError, TypeError):
        raise AlignezError(f"{ROLE.server(url)} did not answer with a completion (no choices[0].text); "
                           "--generate-url needs an OpenAI-compatible /v1/completions") from None
    usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else {}

    def count(key: str) -> int:
        v = usage.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) else 0

    finish = choice.get("finish_reason")
    return Completion(text, count("completion_tokens"), finish if finish in ("stop", "length") else "stop",
                      count("prompt_tokens"))
