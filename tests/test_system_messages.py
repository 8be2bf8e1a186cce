"""System messages are framed the same way in SFT data (data.py), prompts (infer.py) and the API
(serve.py): one function, data.chat_encode, for Nano's framing; an imported model's own template."""
import json

import pytest

import infer
from data import DataError, _sft_messages, chat_encode, load_sft_rows, prepare_sft, sft_encode
from tokenizer import TrieTokenizer, SPECIAL_TOKENS

@pytest.fixture(scope="module")
def tok():
    return TrieTokenizer(SPECIAL_TOKENS + list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .?!,\n")
                         + ["the", " cat", " sat", " be", " brief", " what", " a", " red", " dog"])


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "what sat?"},
                {"role": "assistant", "content": "a cat"}, {"role": "system", "content": "Now in capitals."},
                {"role": "user", "content": "what dog?"}, {"role": "assistant", "content": "A RED DOG"}]


def test_a_system_message_goes_before_the_next_question_in_training_and_in_prompts(tok):
    ids, mask = sft_encode(tok, CONVERSATION)
    want = ([tok.bos_id, tok.instruct_id] + tok.encode("Be brief.\n\nwhat sat?") + [tok.response_id]
            + tok.encode("a cat") + [tok.eos_id]
            + [tok.instruct_id] + tok.encode("Now in capitals.\n\nwhat dog?") + [tok.response_id]
            + tok.encode("A RED DOG") + [tok.eos_id])
    assert ids == want
    assert [i for i, m in zip(ids, mask) if m] == tok.encode("a cat") + [tok.eos_id] + tok.encode("A RED DOG") + [tok.eos_id]
    # the prompt infer.py and serve.py feed for the same conversation up to the last question is the
    # training sample up to where the answer begins
    prompt = infer.chat_ids(tok, CONVERSATION[:-1])
    assert prompt == ids[:len(prompt)] and ids[len(prompt) - 1] == tok.response_id
    assert ids[len(prompt):] == tok.encode("A RED DOG") + [tok.eos_id]
    # the original 2024.10 framing: the same without <|bos|>
    assert infer.chat_ids(tok, CONVERSATION[:-1], infer.FRAMING_2024) == prompt[1:]
    assert chat_encode(tok, CONVERSATION, bos=False)[0] == ids[1:]


@pytest.mark.parametrize("messages,why", [
    ([{"role": "system", "content": "x"}], "must end with an assistant message"),
    ([{"role": "user", "content": "q"}], "must end with an assistant message"),
    ([{"role": "assistant", "content": "a"}], "message 0: a assistant message where a user or system"),
    ([{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
     "message 1: a system message where an assistant"),
    ([{"role": "user", "content": "q"}, {"role": "user", "content": "q"}], "message 1: a user message"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "system", "content": "s"}],
     "message 2: the conversation must end with an assistant message"),
    ([{"role": "tool", "content": "q"}], "message 0: expected an object with a role"),
    ([{"role": "user", "content": 3}], "message 0: expected an object with a role"),
    (["user"], "message 0: expected an object with a role"),
    ([], "non-empty list"),
])
def test_malformed_conversations_are_named(messages, why):
    got, reason = _sft_messages({"messages": messages})
    assert got is None and why in reason


def test_data_py_keeps_samples_with_system_messages(tok, tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    lines = [{"messages": CONVERSATION}] * 30 + [{"question": "what sat?", "answer": "a cat"}] * 30
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "tok.json").write_text(json.dumps(tok.to_dict()))
    meta = prepare_sft([str(path)], str(tmp_path / "sft"), tokenizer=str(tmp_path / "tok.json"), block_size=64,
                       val_ratio=0.2, pack=False)
    assert meta["skipped_lines"] == 0 and "skipped" not in capsys.readouterr().err
    assert meta["train_samples"] + meta["val_samples"] == 60
    rows = [r.tolist() for split in ("train", "val") for r in load_sft_rows(str(tmp_path / "sft"), split)[0]]
    want = sft_encode(tok, CONVERSATION)[0]
    assert sum(r[:len(want)] == want for r in rows) == 30


def test_serve_frames_system_messages_as_infer_does(tok):
    import serve
    body = {"messages": [{"role": "developer", "content": "Be brief."}, *CONVERSATION[1:5]]}
    assert infer.chat_ids(tok, serve.chat_messages(body)) == infer.chat_ids(tok, CONVERSATION[:5])


@pytest.mark.parametrize("arch,family", [("qwen2", "chatml"), ("llama", "llama3")])
def test_an_imported_model_frames_system_messages_as_its_template(arch, family, tmp_path):
    """SFT samples of a Hugging Face model: up to each answer, the ids transformers' apply_chat_template
    gives for the conversation so far; the answers and their end of turn are what is trained."""
    import transformers
    from corpus import default_corpus_documents
    from hf import load_checkpoint
    from test_hf import make_hf_model
    from tokenizer import tokenizer_from_dict
    make_hf_model(str(tmp_path), arch, family, list(default_corpus_documents())[:200])
    hf_tok = tokenizer_from_dict(load_checkpoint(str(tmp_path))["tokenizer"])
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ids, mask = sft_encode(hf_tok, CONVERSATION)
    turn_end = hf_tok.token_to_id({"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}[family])
    for end in (1, 4):  # the conversation up to each user message
        want = ref.apply_chat_template(CONVERSATION[:end + 1], add_generation_prompt=True, tokenize=True)
        want = list(want["input_ids"] if hasattr(want, "keys") else want)
        assert ids[:len(want)] == want and ids[len(want) - 1] != turn_end  # (the reply follows)
        assert infer.chat_ids(hf_tok, CONVERSATION[:end + 1]) == want
    assert [i for i, m in zip(ids, mask) if m] == (hf_tok.encode("a cat") + [turn_end]
                                                   + hf_tok.encode("A RED DOG") + [turn_end])
