"""The shared scorers on a real (randomly initialised) tiny Llama with the byte tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from evomerge import inference  # noqa: E402
from evomerge.errors import TaskError  # noqa: E402
from evomerge.tasks import Example  # noqa: E402
from evomerge.zoo.tokenizer import byte_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    m = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # a larger scale than the default init, so outputs differ visibly between tokens
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.eval()


EXAMPLES = [Example("upper: cat = ", "CAT"), Example("a much longer prompt here = ", "x"),
            Example("add 2+3 = ", "5"), Example("rev: abcdef = ", "fedcba")]


def test_encode_keeps_the_answer_boundary(tokenizer):
    ((ids, n_prompt),) = inference.encode(tokenizer, [("ab", "cd")], eos=True)
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids[n_prompt:-1]) == "cd"
    assert ids[-1] == tokenizer.eos_token_id


def test_cross_entropy_matches_hand_computed_log_softmax(model, tokenizer):
    ex = EXAMPLES[0]
    ((ids, n_prompt),) = inference.encode(tokenizer, [(ex.prompt, ex.answer)])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    expected = -np.mean([logp[t - 1, ids[t]].item() for t in range(n_prompt, len(ids))])
    got = inference.answer_cross_entropy(model, tokenizer, [ex])
    assert got.shape == (1,)
    assert got[0] == pytest.approx(expected, rel=1e-5)


def test_end_ids_are_the_tokens_that_end_a_generated_answer(tokenizer):
    texts = {i: tokenizer.decode([i]) for i in inference.end_ids(tokenizer)}
    assert tokenizer.eos_token_id in texts
    assert tokenizer.convert_tokens_to_ids("\n") in texts or any(t == "\n" for t in texts.values())
    newline = [i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i])]
    kept = [i for i in newline if not tokenizer.decode([i]).split("\n", 1)[0].strip()]
    assert set(texts) - {tokenizer.eos_token_id} == set(kept)


def test_the_stop_cross_entropy_adds_the_end_as_one_more_token(model, tokenizer):
    """By hand, from the full logits of `prompt + answer`: the answer tokens' log-probabilities and,
    after the last of them, the log of the probability mass on every token that ends an answer."""
    scores = inference.answer_scores(model, tokenizer, EXAMPLES, batch_size=3, stop=True)
    ends = list(inference.end_ids(tokenizer))
    for e, ce, ce_stop in zip(EXAMPLES, scores.ce, scores.ce_stop, strict=True):
        ((ids, n_prompt),) = inference.encode(tokenizer, [(e.prompt, e.answer)])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        answer = [logp[t - 1, ids[t]].item() for t in range(n_prompt, len(ids))]
        end = torch.logsumexp(logp[len(ids) - 1, ends], dim=0).item()
        assert ce == pytest.approx(-np.mean(answer), rel=1e-5)
        assert ce_stop == pytest.approx(-(sum(answer) + end) / (len(answer) + 1), rel=1e-5)
    assert inference.answer_scores(model, tokenizer, EXAMPLES).ce_stop is None  # not asked: not computed


def test_padding_and_batching_do_not_change_cross_entropy(model, tokenizer):
    alone = np.array([inference.answer_cross_entropy(model, tokenizer, [e])[0] for e in EXAMPLES])
    batched = inference.answer_cross_entropy(model, tokenizer, EXAMPLES, batch_size=64)
    pairs = inference.answer_cross_entropy(model, tokenizer, EXAMPLES, batch_size=3)
    np.testing.assert_allclose(batched, alone, rtol=1e-5)
    np.testing.assert_allclose(pairs, alone, rtol=1e-5)
    assert len(set(np.round(alone, 4))) == len(EXAMPLES)  # the examples really differ


def test_cross_entropy_leaves_the_model_mode_alone(model, tokenizer):
    model.train()
    try:
        inference.answer_cross_entropy(model, tokenizer, EXAMPLES[:1])
        assert model.training
    finally:
        model.eval()


def test_empty_answer_is_rejected(model, tokenizer):
    with pytest.raises(TaskError, match="non-empty"):
        inference.answer_cross_entropy(model, tokenizer, [Example("p = ", "")])


def test_generation_batched_equals_unbatched_and_follows_greedy(model, tokenizer):
    batched = inference.generate_answers(model, tokenizer, EXAMPLES, max_new_tokens=6)
    alone = [inference.generate_answers(model, tokenizer, [e], max_new_tokens=6)[0] for e in EXAMPLES]
    assert batched == alone
    # Reference greedy decode by hand for the first example, from the prompt without its trailing
    # space (which belongs to the answer).
    ids = tokenizer(EXAMPLES[0].prompt.rstrip(" "))["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == tokenizer.eos_token_id:
                break
            out.append(nxt)
    expected = tokenizer.decode(out, skip_special_tokens=True).split("\n", 1)[0].strip()
    assert batched[0] == expected


def test_generation_stops_at_the_first_newline_token(model, tokenizer):
    """A row ends at a token holding a newline, as at EOS: no further steps are paid for it."""
    (newline,) = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert newline in inference._stop_ids(tokenizer) and tokenizer.eos_token_id in inference._stop_ids(tokenizer)
    calls = []

    def favour_newline(module, args, output):
        calls.append(output.shape[1])
        if len(calls) > 1:  # the first generated token is free, every later one is a newline
            output[..., newline] += 1e4
        return output

    plain = inference.generate_answers(model, tokenizer, EXAMPLES[:2], max_new_tokens=8)
    handle = model.lm_head.register_forward_hook(favour_newline)
    try:
        answers = inference.generate_answers(model, tokenizer, EXAMPLES[:2], max_new_tokens=8)
    finally:
        handle.remove()
    assert len(calls) == 2  # the prompt pass and one step, not eight
    assert answers == [p[:1] for p in plain]


def test_choice_accuracy_picks_lowest_cross_entropy(model, tokenizer):
    choices = ("CAT", "dog", "x")
    ce = inference.answer_cross_entropy(model, tokenizer, [Example("upper: cat = ", c) for c in choices])
    best = choices[int(np.argmin(ce))]
    worst = choices[int(np.argmax(ce))]
    acc = inference.choice_accuracy(model, tokenizer, [Example("upper: cat = ", best, choices=choices),
                                                      Example("upper: cat = ", worst, choices=choices)])
    np.testing.assert_array_equal(acc, [1.0, 0.0])
    with pytest.raises(TaskError, match="choices"):
        inference.choice_accuracy(model, tokenizer, [Example("p", "a")])


def test_exact_match_is_cased_and_its_ci_variant_folds():
    assert inference.exact_match("  Paris ", "Paris") == 1.0
    assert inference.exact_match("paris", "Paris") == 0.0  # a lowercase answer to a cased question is wrong
    assert inference.exact_match("P", "p") == 0.0
    assert inference.exact_match("New  York", "New York") == 0.0
    assert inference.exact_match_ci("  paris ", "Paris") == 1.0
    assert inference.exact_match_ci("new  york", "New York") == 1.0
    assert inference.exact_match_ci("Paris.", "paris") == 0.0
    examples = [Example("q", "ABC"), Example("q", "abc")]
    got = inference.text_scores(("exact_match", "exact_match_ci"), ["abc", "abc"], examples)
    np.testing.assert_array_equal(got["exact_match"], [0.0, 1.0])
    np.testing.assert_array_equal(got["exact_match_ci"], [1.0, 1.0])


def test_f1():
    assert inference.token_f1("the big cat", "big cat") == pytest.approx(0.8)
    assert inference.token_f1("dog", "cat") == 0.0
    assert inference.token_f1("", "") == 1.0


def test_greedy_match_is_whether_greedy_decoding_yields_the_answer(model, tokenizer):
    examples = list(EXAMPLES)
    for i in range(200):  # prompts whose greedy continuation is text that re-encodes to the same ids
        prompt = f"q{i} ="
        ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=2, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
        text = tokenizer.decode(out)
        if text.isprintable() and list(tokenizer(text, add_special_tokens=False)["input_ids"]) == out:
            examples.append(Example(prompt, text))  # the model's own greedy continuation
        if len(examples) == len(EXAMPLES) + 3:
            break
    ce, greedy, _ = inference.answer_scores(model, tokenizer, examples, batch_size=3)
    for e, got in zip(examples, greedy):
        ((ids, n_prompt),) = inference.encode(tokenizer, [(e.prompt, e.answer)])
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        assert got == float(all(int(logits[t - 1].argmax()) == ids[t] for t in range(n_prompt, len(ids))))
    assert greedy[len(EXAMPLES):].tolist() == [1.0] * (len(examples) - len(EXAMPLES)) and len(examples) > len(EXAMPLES)
    assert greedy.min() == 0.0
    np.testing.assert_allclose(ce, inference.answer_cross_entropy(model, tokenizer, examples), rtol=1e-6)


def test_whether_a_model_takes_logits_to_keep_is_asked_once_per_class(model, tokenizer, monkeypatch):
    """The class's answer is remembered; a forward set on one instance is asked on its own, and
    scoring through it (no logits_to_keep) gives the same CE as the full model's span."""
    import inspect

    asked = []
    real = inspect.signature
    monkeypatch.setattr(inspect, "signature", lambda f, *a, **k: asked.append(f) or real(f, *a, **k))
    inference._class_keeps_logits.cache_clear()
    assert inference._keeps_logits(model) and inference._keeps_logits(model)
    assert len(asked) == 1
    plain = transformers.LlamaForCausalLM(model.config).eval()
    plain.load_state_dict(model.state_dict())
    full = plain.forward
    plain.forward = lambda input_ids=None, attention_mask=None: full(input_ids=input_ids, attention_mask=attention_mask)
    assert not inference._keeps_logits(plain) and inference._keeps_logits(model)
    np.testing.assert_allclose(inference.answer_cross_entropy(plain, tokenizer, EXAMPLES),
                               inference.answer_cross_entropy(model, tokenizer, EXAMPLES), atol=1e-5)
    np.testing.assert_allclose(inference.answer_scores(plain, tokenizer, EXAMPLES, stop=True).ce_stop,
                               inference.answer_scores(model, tokenizer, EXAMPLES, stop=True).ce_stop, atol=1e-5)


def test_a_tokenizer_with_no_token_to_end_an_answer_is_refused_in_one_line():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    words = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"a": 0, "b": 1}, "a")))
    with pytest.raises(TaskError, match="no EOS or newline token.*use objective metric 'ce'"):
        inference.end_ids(words)
