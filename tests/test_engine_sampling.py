"""Sampling, seeds, stop conditions, detokenization, logprobs and non-finite logits."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from peftserve.engine.detokenizer import Detokenizer
from peftserve.engine.engine import NON_FINITE_ERROR
from peftserve.engine.sampler import Sampler, SamplingTensors
from peftserve.engine.sampling_params import SamplingParams
from tests.engine_helpers import (
    generate_all,
    greedy,
    load_hf,
    make_engine,
    random_prompts,
    run_to_completion,
)
from tests.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m"), "llama")


@pytest.fixture(scope="module")
def engine(model_dir):
    return make_engine(model_dir)


def _rows(params: list[SamplingParams], draw_index: list[int] | None = None) -> SamplingTensors:
    return SamplingTensors.build(params, draw_index or [0] * len(params), torch.device("cpu"))


# ---- the sampler alone ----------------------------------------------------------------------


def test_sampler_follows_the_distribution():
    sampler = Sampler(torch.Generator().manual_seed(0))
    n = 4000
    logits = torch.log(torch.tensor([[0.25, 0.75]])).repeat(n, 1)
    ids = torch.tensor(sampler(logits, _rows([SamplingParams(temperature=1.0)] * n)).token_ids)
    assert abs(ids.float().mean().item() - 0.75) < 0.03


def test_sampler_top_k_and_top_p():
    sampler = Sampler(torch.Generator().manual_seed(0))
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(600, 1)
    top_k = SamplingParams(temperature=2.0, top_k=2)
    top_p = SamplingParams(temperature=1.0, top_p=0.7)  # p(3) = 0.64, p(2) = 0.24: keeps {3, 2}
    plain = SamplingParams(temperature=2.0)
    params = [top_k] * 200 + [top_p] * 200 + [plain] * 200
    ids = sampler(logits, _rows(params)).token_ids
    assert (
        set(ids[:200]) == {2, 3} and set(ids[200:400]) == {2, 3} and set(ids[400:]) == {0, 1, 2, 3}
    )


def test_sampler_greedy_logprobs_and_non_finite_rows():
    sampler = Sampler(torch.Generator().manual_seed(0))
    logits = torch.tensor([[0.0, 2.0, 1.0], [float("nan"), 0.0, 1.0], [3.0, 0.0, 1.0]])
    out = sampler(logits, _rows([SamplingParams(temperature=0, logprobs=2)] * 3))
    assert out.token_ids[0] == 1 and out.token_ids[2] == 0
    assert out.finite == [True, False, True]
    lp0, top_ids, top_lps = out.logprobs[0]
    want = logits[0].log_softmax(-1)
    assert lp0 == pytest.approx(want[1].item()) and top_ids == [1, 2]
    assert top_lps == pytest.approx([want[1].item(), want[2].item()])


def test_sampler_seeded_row_ignores_the_batch():
    logits = torch.randn(5, 50)
    seeded = SamplingParams(temperature=1.0, seed=7)
    alone = [
        Sampler(torch.Generator().manual_seed(0))(logits[2:3], _rows([seeded], [i])).token_ids[0]
        for i in range(8)
    ]
    params = (
        [SamplingParams(temperature=0.5)] * 2
        + [seeded]
        + [SamplingParams(temperature=0, seed=7), seeded]
    )
    for i in range(8):
        batched = Sampler(torch.Generator().manual_seed(123 + i))(
            logits, _rows(params, [0, 0, i, i, i])
        )
        assert batched.token_ids[2] == alone[i]
    assert len(set(alone)) > 1  # the draw index moves the noise


def test_seeded_rows_follow_the_distribution():
    sampler = Sampler(torch.Generator().manual_seed(0))
    n = 4000
    logits = torch.log(torch.tensor([[0.25, 0.75]])).repeat(n, 1)
    # one request's successive draws, and the first draws of many seeds
    one_seed = _rows([SamplingParams(temperature=1.0, seed=5)] * n, list(range(n)))
    many_seeds = _rows([SamplingParams(temperature=1.0, seed=i) for i in range(n)])
    for rows in (one_seed, many_seeds):
        assert (
            abs(torch.tensor(sampler(logits, rows).token_ids).float().mean().item() - 0.75) < 0.03
        )


# ---- the detokenizer alone --------------------------------------------------------------------


def test_stop_string_text_is_held_back_then_released(engine):
    detok = Detokenizer(engine.tokenizer)
    tok = engine.tokenizer

    def token(ch: str) -> int:
        (tid,) = tok.encode(ch, add_special_tokens=False)
        return tid

    state = detok.start(tok.encode("x", add_special_tokens=False), ["abc", "zz"])
    emitted = []
    for ch in "qab":
        assert not detok.update(state, token(ch))
        emitted.append(detok.take_text(state, final=False))
    assert emitted == ["q", "", ""]  # "ab" could begin "abc"
    assert not detok.update(state, token("d")) and detok.take_text(state, final=False) == "abd"
    for ch in "zab":
        detok.update(state, token(ch))
    assert detok.update(state, token("c"))  # stop string completed
    assert state.output_text == "qabdz" and detok.take_text(state, final=True) == "z"


# ---- through the engine ----------------------------------------------------------------------


def test_seed_gives_same_output_alone_and_batched(engine):
    prompts = random_prompts((7, 19, 25, 3, 12), seed=6)
    seeded = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = generate_all(engine, [prompts[0]], seeded)["0"].token_ids
    mixed = [seeded, SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True), greedy(5),
             SamplingParams(max_tokens=20, temperature=0.7, seed=99, ignore_eos=True), seeded]  # fmt: skip
    batched = generate_all(engine, prompts, mixed)
    assert batched["0"].token_ids == alone
    other_seed = SamplingParams(
        max_tokens=20, temperature=1.0, top_p=0.9, seed=4321, ignore_eos=True
    )
    assert generate_all(engine, [prompts[0]], other_seed)["0"].token_ids != alone


def test_top_k_one_and_tiny_top_p_are_greedy(engine):
    prompts = random_prompts((6, 14), seed=7)
    want = generate_all(engine, prompts, greedy(12))
    for params in (SamplingParams(max_tokens=12, top_k=1, ignore_eos=True),
                   SamplingParams(max_tokens=12, top_p=1e-6, ignore_eos=True)):  # fmt: skip
        got = generate_all(engine, prompts, params)
        assert [got[k].token_ids for k in "01"] == [want[k].token_ids for k in "01"]


def test_stop_string_cuts_output(engine):
    prompts = random_prompts((9, 16, 23, 4), seed=8)
    full = generate_all(engine, prompts, greedy(24))
    stops = [full[str(i)].text[8:11] for i in range(len(prompts))]
    params = [greedy(24, stop=[stop, "never!"]) for stop in stops]
    cut = generate_all(engine, prompts, params)
    for i in range(len(prompts)):
        text, stop, res = full[str(i)].text, stops[i], cut[str(i)]
        assert res.text == text[: text.index(stop)]  # streamed deltas add up to the cut text
        assert res.last.finish_reason == "stop" and stop not in res.text


def test_eos_stops_unless_ignored(engine):
    prompts = random_prompts(range(3, 33), seed=9)
    free = generate_all(engine, prompts, greedy(24))
    eos = engine.tokenizer.eos_token_id
    hits = [k for k, r in free.items() if eos in r.token_ids]
    assert hits, "no prompt reaches EOS: pick another seed"
    stopped = generate_all(engine, prompts, SamplingParams(max_tokens=24, temperature=0))
    for key, res in stopped.items():
        ids = free[key].token_ids
        if key in hits:
            assert res.token_ids == ids[: ids.index(eos) + 1] and res.last.finish_reason == "stop"
        else:
            assert res.token_ids == ids and res.last.finish_reason == "length"
        assert res.last.completion_tokens == len(res.token_ids)


def test_logprobs_match_hf_log_softmax(engine, model_dir):
    prompt = random_prompts((11,), seed=10)[0]
    res = generate_all(engine, [prompt], greedy(8, logprobs=3))["0"]
    ref = load_hf(model_dir)
    with torch.no_grad():
        logits = ref(input_ids=torch.tensor([prompt + res.token_ids])).logits[0].float()
    want = logits[len(prompt) - 1 : -1].log_softmax(-1)  # [8, V]
    lps = [lp for out in res.outputs for lp in out.logprobs]
    assert len(lps) == 8
    for k, (token, lp) in enumerate(zip(res.token_ids, lps, strict=True)):
        assert lp.logprob == pytest.approx(want[k, token].item(), abs=1e-4)
        assert lp.token == engine.tokenizer.decode([token])
        top_ids = want[k].topk(3).indices.tolist()
        assert list(lp.top) == [engine.tokenizer.decode([i]) for i in top_ids]
        assert list(lp.top.values()) == pytest.approx(want[k, top_ids].tolist(), abs=1e-4)


def test_non_finite_logits_end_only_that_request(engine):
    prompts = random_prompts((5, 9, 13), seed=11)
    want = generate_all(engine, prompts, greedy(6))
    execute = engine.runner.execute
    calls = 0

    def poisoned(sched):
        nonlocal calls
        logits, seqs, sampling = execute(sched)
        calls += 1
        if calls == 3:
            logits[[s.request_id for s in seqs].index("1")] = float("nan")
        return logits, seqs, sampling

    engine.runner.execute = poisoned
    try:
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, greedy(6))
        got = run_to_completion(engine)
    finally:
        engine.runner.execute = execute
    assert got["1"].last.finish_reason == "error" and got["1"].last.error == NON_FINITE_ERROR
    assert got["1"].token_ids == want["1"].token_ids[:2]
    assert got["0"].token_ids == want["0"].token_ids and got["2"].token_ids == want["2"].token_ids


def test_batched_detokenization_equals_one_token_at_a_time():
    """update_many (one Rust decode_batch for many requests) gives the text and stop cuts of
    the plain per-token algorithm, through multi-byte characters split across byte tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<s>", "</s>"],
    )
    bpe.train_from_iterator(["héllo wörld, 日本語のテキスト 🙂 ça va? naïve café"] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    gen = torch.Generator().manual_seed(0)
    streams = [torch.randint(0, len(tok), (40,), generator=gen).tolist() for _ in range(6)]
    stops = [[], ["é"], ["ö", "日"], [" "], ["🙂"], []]

    def reference(stream, stop):  # the per-token algorithm, with the tokenizer's own decode
        ids, prefix, read, text = stream[:5], 0, 5, ""
        for token in stream[5:]:
            ids.append(token)
            before = text
            old = tok.decode(ids[prefix:read], skip_special_tokens=True)
            new = tok.decode(ids[prefix:], skip_special_tokens=True)
            if len(new) > len(old) and not new.endswith("\ufffd"):
                text += new[len(old) :]
                prefix, read = read, len(ids)
            cuts = [i for s in stop if (i := text.find(s, max(0, len(before) - len(s) + 1))) != -1]
            if cuts:
                return text[: min(cuts)]
        return text

    detok = Detokenizer(tok)
    states = [detok.start(s[:5], stop) for s, stop in zip(streams, stops, strict=True)]
    for k in range(5, 40):
        live = [i for i, st in enumerate(states) if not st.stopped]
        detok.update_many([(states[i], streams[i][k]) for i in live])
    for stream, stop, state in zip(streams, stops, states, strict=True):
        assert state.output_text == reference(stream, stop)
    assert any(state.stopped for state in states) and not all(state.stopped for state in states)
