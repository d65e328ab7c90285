"""Several choices per request (n > 1: forked after one shared prefill), logit bias,
presence/frequency/repetition penalties (vLLM's formulas, against a per-token reference) and
prompt logprobs (against HF's forward)."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from peftserve.engine.block_manager import BlockManager
from peftserve.engine.outputs import RequestOutput
from peftserve.engine.sampler import Sampler, SamplingTensors
from peftserve.engine.sampling_params import InvalidParameter, SamplingParams
from peftserve.engine.sequence import Sequence
from tests.engine_helpers import greedy, load_hf, make_engine, random_prompts
from tests.tiny_models import make_tiny_model

VOCAB = 40


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m"), "llama")


@pytest.fixture(scope="module")
def engine(model_dir):
    return make_engine(
        model_dir, max_num_seqs=8, max_num_batched_tokens=16
    )  # prompts > 16: chunked


def run(
    engine, requests: dict[str, tuple[list[int], SamplingParams]]
) -> dict[tuple[str, int], list[RequestOutput]]:
    """Run the requests dry; every output by (request id, choice index)."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    outputs: dict[tuple[str, int], list[RequestOutput]] = defaultdict(list)
    for _ in range(2000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            key = (out.request_id, out.index)
            assert not (outputs[key] and outputs[key][-1].finished), (
                f"{key} got output after finishing"
            )
            outputs[key].append(out)
    assert not engine.has_unfinished_requests()
    assert engine.stats.kv_blocks_used == 0, "every block, shared ones included, is free again"
    return dict(outputs)


def tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for out in outs for t in out.token_ids]


def logprobs(outs: list[RequestOutput]) -> list[float]:
    return [lp.logprob for out in outs for lp in out.logprobs or []]


# ---- n > 1 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt_len", [13, 16, 35], ids=["partial-block", "full-block", "chunked"])
def test_greedy_choices_share_one_prefill_and_match_one_choice(engine, prompt_len: int) -> None:
    """Forked choices read the shared blocks and their copy of the partly filled last one: a
    wrong copy or a block freed under a sibling would change their greedy tokens."""
    prompt = random_prompts((prompt_len,), seed=prompt_len)[0]
    one = run(engine, {"one": (prompt, greedy(8, logprobs=0))})[("one", 0)]
    before = engine.stats.tokens
    got = run(engine, {"r": (prompt, greedy(8, n=3, logprobs=0))})
    assert sorted(got) == [("r", 0), ("r", 1), ("r", 2)]
    for index in range(3):
        assert tokens(got[("r", index)]) == tokens(one)
        assert logprobs(got[("r", index)]) == pytest.approx(logprobs(one), abs=1e-5)
        assert got[("r", index)][-1].finish_reason == "length"
    assert engine.stats.tokens - before == prompt_len + 3 * 7, "the prompt ran once"


def test_seeded_choices_differ_and_repeat_and_choice_zero_is_n_one(engine) -> None:
    prompt = random_prompts((11,), seed=3)[0]
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=77, ignore_eos=True)
    alone = tokens(run(engine, {"a": (prompt, seeded)})[("a", 0)])
    many = SamplingParams(max_tokens=8, temperature=1.0, seed=77, ignore_eos=True, n=4)
    first = {k: tokens(v) for k, v in run(engine, {"m": (prompt, many)}).items()}
    again = {
        k: tokens(v)
        for k, v in run(engine, {"m": (prompt, many), "x": (prompt, greedy(5))}).items()
    }
    assert first[("m", 0)] == alone
    assert len({tuple(v) for v in first.values()}) == 4, "each choice draws its own tokens"
    assert {k: v for k, v in again.items() if k[0] == "m"} == first


def test_choices_without_room_for_a_fork_are_prefilled_on_their_own(model_dir) -> None:
    """Too few free blocks for the copies: the choices queue as sequences of their own and
    draw the same seeded tokens as forked ones."""
    prompt = random_prompts((21,), seed=5)[0]  # 2 blocks, the last partly filled
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=9, ignore_eos=True, n=3)
    roomy = run(make_engine(model_dir, max_num_seqs=8), {"r": (prompt, params)})
    tight = make_engine(model_dir, num_blocks=3, max_num_seqs=8, max_model_len=32)
    before = tight.stats.tokens
    cramped = run(tight, {"r": (prompt, params)})
    assert {k: tokens(v) for k, v in cramped.items()} == {k: tokens(v) for k, v in roomy.items()}
    assert tight.stats.tokens - before >= 3 * 21, "each choice ran the prompt"


def test_abort_and_limits(engine) -> None:
    prompt = random_prompts((9,), seed=8)[0]
    engine.add_request("gone", prompt, greedy(30, n=3))
    engine.step()
    engine.step()
    engine.abort_request("gone")
    assert not engine.has_unfinished_requests() and engine.stats.kv_blocks_used == 0
    with pytest.raises(InvalidParameter, match="max_num_seqs") as e:
        engine.add_request("big", prompt, greedy(4, n=9))
    assert e.value.param == "n"
    with pytest.raises(InvalidParameter, match="logit_bias") as e:
        engine.add_request("bias", prompt, greedy(4, logit_bias={10**6: 1.0}))
    assert e.value.param == "logit_bias"


def test_block_manager_shares_full_blocks_and_frees_them_with_the_last_holder() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    params = SamplingParams()
    parent = Sequence("p", list(range(10)), 10, params)
    bm.allocate(parent, 10)  # 3 blocks, the last holding 2 tokens
    kids = [Sequence(f"p#{i}", list(range(10)), 10, params) for i in (1, 2)]
    assert bm.can_fork(parent, 2)
    copies = [bm.fork(parent, kid) for kid in kids]
    assert all(kid.block_table[:2] == parent.block_table[:2] for kid in kids)
    assert [c[0] for c in copies] == [parent.block_table[-1]] * 2
    assert len({kid.block_table[-1] for kid in kids} | {parent.block_table[-1]}) == 3
    assert bm.num_used_blocks == 5 and bm.exclusive_blocks(parent) == [parent.block_table[-1]]
    bm.free(parent)
    bm.free(kids[0])
    assert bm.num_used_blocks == 3  # the shared two and kid 1's last block
    bm.free(kids[1])
    assert bm.num_used_blocks == 0


# ---- logit bias and penalties ----------------------------------------------------------------


def _reference(
    logits: torch.Tensor, p: SamplingParams, history: tuple[list[int], int]
) -> torch.Tensor:
    """vLLM's penalties, one token at a time (float64), after the logit bias."""
    out = logits.double().clone()
    for token, bias in p.logit_bias.items():
        out[token] += bias
    ids, n_prompt = history
    generated = ids[n_prompt:]
    for token in set(ids):
        if p.repetition_penalty != 1.0:
            out[token] = (
                out[token] / p.repetition_penalty
                if out[token] > 0
                else out[token] * p.repetition_penalty
            )
    for token in set(generated):
        out[token] -= p.frequency_penalty * generated.count(token) + p.presence_penalty
    return out


def test_bias_and_penalties_match_the_per_token_reference(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, VOCAB, generator=gen) * 3
    histories = [
        (torch.randint(0, VOCAB, (n,), generator=gen).tolist(), p)
        for n, p in ((12, 5), (7, 7), (20, 3), (9, 4), (6, 2))
    ]
    params = [
        SamplingParams(temperature=0, presence_penalty=0.7, frequency_penalty=0.4),
        SamplingParams(temperature=0, repetition_penalty=1.6),
        SamplingParams(temperature=0, presence_penalty=-1.0, frequency_penalty=2.0, repetition_penalty=0.7,
                       logit_bias={3: 5.0, 7: -100.0}),
        SamplingParams(temperature=0),  # untouched
        SamplingParams(temperature=0, logit_bias={int(logits[4].argmin()): 100.0}),
    ]  # fmt: skip
    st = SamplingTensors.build(
        params, [0] * 5, torch.device("cpu"), histories=histories, vocab=VOCAB
    )
    adjusted = logits.clone()
    adjusted.index_put_((st.bias.rows, st.bias.tokens), st.bias.values, accumulate=True)
    from peftserve.engine.sampler import apply_penalties

    apply_penalties(adjusted, st.penalties)
    for i, (p, history) in enumerate(zip(params, histories, strict=True)):
        assert torch.allclose(adjusted[i].double(), _reference(logits[i], p, history), atol=1e-5), (
            f"row {i}"
        )
    out = Sampler(torch.Generator())(logits, st)
    assert out.token_ids == adjusted.argmax(-1).tolist()  # greedy rows take the adjusted argmax
    assert out.token_ids[4] == int(logits[4].argmin())
    assert out.token_ids[3] == int(logits[3].argmax())


def test_penalties_change_generation_only_where_asked(engine) -> None:
    prompt = random_prompts((10,), seed=11)[0]
    plain = tokens(run(engine, {"p": (prompt, greedy(16))})[("p", 0)])
    assert len(set(plain)) < len(plain), "greedy repeats itself here: pick another seed"
    damped = tokens(
        run(engine, {"d": (prompt, greedy(16, frequency_penalty=2.0, presence_penalty=2.0))})[
            ("d", 0)
        ]
    )
    assert damped != plain and len(set(damped)) > len(set(plain))
    banned = plain[0]
    biased = tokens(run(engine, {"b": (prompt, greedy(16, logit_bias={banned: -100.0}))})[("b", 0)])
    assert banned not in biased


# ---- prompt logprobs -------------------------------------------------------------------------


def test_prompt_logprobs_match_hf_with_top_k(engine, model_dir) -> None:
    prompt = random_prompts((19,), seed=12)[0]
    outs = run(engine, {"e": (prompt, greedy(3, prompt_logprobs=2, n=2))})
    with torch.no_grad():
        logits = load_hf(model_dir)(input_ids=torch.tensor([prompt])).logits[0].float()
    want = logits[:-1].log_softmax(-1)  # row i predicts prompt token i + 1
    for index in (0, 1):
        first = outs[("e", index)][0]
        assert first.token_ids and first.prompt_logprobs is not None
        head, *items = first.prompt_token_logprobs
        assert head.logprob is None and head.token == engine.tokenizer.decode([prompt[0]])
        assert len(items) == len(prompt) - 1 == len(first.prompt_logprobs)
        for i, item in enumerate(items):
            token = prompt[i + 1]
            assert item.logprob == pytest.approx(want[i, token].item(), abs=1e-4)
            assert item.token == engine.tokenizer.decode([token])
            top = want[i].topk(2)
            assert list(item.top.values()) == pytest.approx(top.values.tolist(), abs=1e-4)
        assert all(out.prompt_token_logprobs is None for out in outs[("e", index)][1:])
