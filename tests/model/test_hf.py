"""The transformers mapping (pipeline/model/hf.py): export and import with equal logits both ways, the tokenizer, bad input.

The export stage itself (`stage=export`) is tests/stages/test_export.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from pydoc_data.topics import topics
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from helpers import ARCHS, GPT2_STYLE, VOCAB, finished_run, tiny_model
from pipeline import runs
from pipeline.errors import UserError
from pipeline.model import GPT, GPTConfig, ScalarGPT, generate, positions_from_mask
from pipeline.model.hf import architecture_of, export
from pipeline.stages import STAGES
from pipeline.tokenizer import save_tokenizer

HF_CLASS = {"gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM}


def left_padded_batch(vocab: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, :1] = 0
    return ids.masked_fill(mask == 0, pad_id), mask


@pytest.mark.parametrize("name", ARCHS)
def test_exported_model_gives_our_logits_and_generations(name, tokenizer, tmp_path):
    model = tiny_model(**ARCHS[name])
    out = tmp_path / "hf"
    figures = export(model, tokenizer, out)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf) is HF_CLASS[name.split("-")[0]] and figures["architecture"] == type(hf).__name__
    assert hf.config.vocab_size == model.config.vocab_size == 320 > len(tokenizer)  # the padded rows stay
    assert hf.config.tie_word_embeddings == model.config.tie_embeddings
    ids, mask = left_padded_batch(VOCAB, tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids), atol=1e-5, rtol=1e-5)
        # Left padding: transformers needs the position ids that our model derives from the mask.
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        ours = model(ids, attention_mask=mask)
    real = mask.bool()  # padded positions' outputs are read by nobody, and differ
    torch.testing.assert_close(theirs[real], ours[real], atol=1e-5, rtol=1e-5)
    # transformers' generate derives positions from the mask itself; greedy continuations agree token for token.
    new = 10
    hf_out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=tokenizer.pad_token_id)
    ours_out = generate(model, ids, mask, max_new_tokens=new, temperature=0.0, pad_id=tokenizer.pad_token_id)
    assert torch.equal(hf_out[:, ids.size(1) :], ours_out.tokens)


@pytest.mark.parametrize("name", ARCHS)
def test_round_trip_keeps_config_and_weights(name, tmp_path):
    model = tiny_model(**ARCHS[name])
    export(model, None, tmp_path / "hf")
    payload = runs.load_model_payload(runs.model_file(tmp_path / "hf"))
    assert payload["config"] == model.config.to_dict()
    again = runs.build_model(payload, GPT, tmp_path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, atol=0, rtol=0, msg=key)


def test_exported_tokenizer_loads_with_auto_tokenizer(tokenizer, tmp_path):
    export(tiny_model(), tokenizer, tmp_path / "hf")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Reverse the list: a, b  ünïcödé\n"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id"):
        assert getattr(loaded, attr) == getattr(tokenizer, attr) is not None, attr
    assert loaded.pad_token_id != loaded.eos_token_id
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert loaded.apply_chat_template(chat, tokenize=False) == tokenizer.apply_chat_template(chat, tokenize=False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["pad_token_id"], config["eos_token_id"]) == (tokenizer.pad_token_id, tokenizer.eos_token_id)


def hf_llama() -> LlamaForCausalLM:
    """A Llama as transformers makes it, with widths our config cannot derive from mlp_ratio."""
    config = LlamaConfig(
        vocab_size=384,
        hidden_size=48,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 1234.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def hf_gpt2() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(vocab_size=384, n_positions=64, n_embd=48, n_layer=2, n_head=4, activation_function="gelu_new"))


@pytest.mark.parametrize("make", [hf_llama, hf_gpt2])
def test_a_transformers_model_imports_with_equal_logits(make, tokenizer, tmp_path):
    torch.manual_seed(0)
    hf = make().eval()
    with torch.no_grad():  # GPT-2 initialises biases to zero; make them count
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path / "hf_model"
    hf.save_pretrained(folder)
    save_tokenizer(tokenizer, tmp_path / "tok")
    for f in (tmp_path / "tok").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    # Exactly what a stage does with init_from=<folder>: model and tokenizer from the folder.
    model, tok, payload, path = runs.load_start(str(folder), STAGES["sft"].starts_from, tmp_path / "outputs", "sft")
    assert path == folder and payload["stage"] == "transformers" and tok.pad_token_id == tokenizer.pad_token_id
    ids, mask = left_padded_batch(384, tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        ours = model(ids, attention_mask=mask)
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-5, rtol=1e-5)
    if make is hf_llama:
        assert model.config.mlp_hidden == 72 and model.config.n_kv_head == 2 and model.config.rope_theta == 1234.0


def test_unsupported_configs_name_their_fields(tmp_path):
    with pytest.raises(UserError, match=r"norm=layernorm has no transformers counterpart"):
        architecture_of(GPTConfig(norm="layernorm"))
    with pytest.raises(UserError, match=r"^model config norm=rmsnorm has no transformers counterpart"):
        architecture_of(GPTConfig(pos_emb="learned", mlp="gelu"))
    with pytest.raises(UserError, match=r"n_kv_head=1 \(grouped-query attention\) has no GPT-2 counterpart"):
        architecture_of(GPTConfig(n_head=2, n_kv_head=1, **GPT2_STYLE))
    # Import: transformers configs with features our model lacks.
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2, activation_function="relu")).save_pretrained(tmp_path / "relu")
    with pytest.raises(UserError, match=r"relu.*config.json: activation_function='relu'"):
        runs.load_model_payload(tmp_path / "relu")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match=r"model_type='bert' is not supported"):
        runs.load_model_payload(runs.model_file(tmp_path / "bert"))
    with pytest.raises(UserError, match=r"without model.pt or config.json"):
        runs.model_file(tmp_path / "bert" / ".." / "relu" / ".." / "bert" / "..")


def test_export_replaces_the_folder_atomically_and_a_scalar_model_exports_its_backbone(tmp_path):
    out = tmp_path / "hf"
    export(tiny_model(seed=1), None, out)
    torch.manual_seed(2)
    scalar = ScalarGPT(tiny_model(seed=2).config)
    export(scalar, None, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folders left beside it
    hf = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, scalar.lm_head(scalar.hidden_states(ids)), atol=1e-5, rtol=1e-5)


def test_a_foreign_tokenizer_gains_our_special_tokens_and_the_embedding_grows(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    # A GPT-2-like tokenizer: byte-level BPE whose only special token is <|endoftext|>, no pad, no roles.
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([topics[k] for k in sorted(topics)[:5]], trainer=trainer)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=backend.get_vocab_size(), n_positions=32, n_embd=32, n_layer=1, n_head=2)).eval()
    folder = tmp_path / "gpt2_like"
    hf.save_pretrained(folder)
    backend.save(str(folder / "tokenizer.json"))
    model, tok, _, _ = runs.load_start(str(folder), STAGES["sft"].starts_from, tmp_path / "outputs", "sft")
    old = backend.get_vocab_size()
    assert len(tok) == old + 5 and tok.pad_token_id >= old and tok.pad_token_id != tok.eos_token_id
    assert model.config.vocab_size == 320  # the grown vocabulary, padded to a multiple of 64
    ids = torch.randint(0, old, (2, 10))
    with torch.no_grad():
        ours = model(ids)
        torch.testing.assert_close(ours[..., :old], hf(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.wte.weight[-1], hf.transformer.wte.weight.mean(dim=0))


def test_a_transformers_folder_without_weights_is_one_clear_error(tmp_path):
    folder = tmp_path / "no_weights"
    hf_gpt2().config.save_pretrained(folder)
    with pytest.raises(UserError, match=r"cannot load the transformers weights in .*no_weights") as info:
        runs.load_model_payload(runs.model_file(folder))
    assert "\n" not in str(info.value)


def test_export_from_a_lightning_checkpoint(tokenizer, tmp_path):
    model = tiny_model(**ARCHS["gpt2"])
    run_dir = finished_run(tmp_path, "sft", "a", tiny_model(seed=5), tokenizer)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"model_config": model.config.to_dict(), "model_kind": "lm"}}, ckpt)
    loaded, tok, _, path = runs.load_start(str(ckpt), STAGES["export"].starts_from, tmp_path, "export")  # what the stage does with init_from=<ckpt>
    assert path == ckpt and len(tok) == len(tokenizer)  # the tokenizer of the run the checkpoint belongs to
    export(loaded, tok, tmp_path / "hf")
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "hf")(input_ids=ids).logits, model(ids), atol=1e-5, rtol=1e-5)


def test_a_ppo_checkpoint_starts_a_stage_from_its_actor(tokenizer, tmp_path):
    """A PPO stage's Lightning checkpoint holds actor, critic, reference and reward model: init_from takes the actor."""
    from pipeline.model import ScalarGPT

    actor, reference = tiny_model(seed=3), tiny_model(seed=4)
    scorer = ScalarGPT(reference.config)
    state = {f"{name}.{k}": v for name, m in (("actor", actor), ("reference", reference), ("critic", scorer), ("reward_model", scorer)) for k, v in m.state_dict().items()}
    run_dir = finished_run(tmp_path, "ppo", "a", tiny_model(seed=5), tokenizer)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    hparams = {"actor_config": actor.config.to_dict(), "reward_config": scorer.config.to_dict(), "ppo": {}, "eos_id": 1, "pad_id": 0}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, ckpt)  # the keys and hyper-parameters PPOModule saves
    loaded, tok, payload, _ = runs.load_start(str(ckpt), STAGES["export"].starts_from, tmp_path, "export")
    assert payload["kind"] == "lm" and len(tok) == len(tokenizer)
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), actor(ids))
    del hparams["actor_config"]
    torch.save({"state_dict": state, "hyper_parameters": hparams}, ckpt)
    with pytest.raises(UserError, match="without a model_config"):
        runs.load_model_payload(ckpt)
