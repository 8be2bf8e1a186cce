"""Model directories as the installed transformers saves them: transformers 5.x writes the chat
template to chat_template.jinja, not into tokenizer_config.json, and Nano reads it from there."""
import os
import shutil

import pytest
import transformers

import infer
from hf import load_checkpoint
from test_hf import CONVERSATIONS, FAMILY, make_hf_model
from tokenizer import tokenizer_from_dict


@pytest.fixture(scope="module")
def corpus():
    from corpus import default_corpus_documents
    return list(default_corpus_documents())[:200]


@pytest.mark.parametrize("arch,family", [("qwen2", "chatml"), ("llama", "llama3")])
def test_a_directory_saved_by_transformers_keeps_its_chat_template(arch, family, tmp_path, corpus):
    made = tmp_path / "made"
    make_hf_model(str(made), arch, family, corpus)
    saved = tmp_path / "saved"
    ref = transformers.AutoTokenizer.from_pretrained(str(made))
    ref.save_pretrained(str(saved))  # the tokenizer files as this transformers writes them
    for name in ("config.json", "model.safetensors"):
        shutil.copy(made / name, saved / name)
    files = set(os.listdir(saved))
    if int(transformers.__version__.split(".")[0]) >= 5:  # the case of the issue: the template in its own file
        assert "chat_template.jinja" in files
    ref = transformers.AutoTokenizer.from_pretrained(str(saved))
    tok = tokenizer_from_dict(load_checkpoint(str(saved))["tokenizer"])
    assert tok.chat == family
    for messages in CONVERSATIONS:
        assert tok.chat_text(messages) == ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        want_ids = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        want_ids = want_ids["input_ids"] if hasattr(want_ids, "keys") else want_ids
        assert infer.chat_ids(tok, messages) == list(want_ids)
    assert tok.stop_ids and ref.convert_tokens_to_ids(FAMILY[family]["eos"]) in tok.stop_ids
