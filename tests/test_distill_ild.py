"""Stage-1 teacher forcing: the hooks record the right teacher tensors, each student layer runs on the teacher's
input to that layer, and the loss equals the per-layer distances computed by hand (float64, 3-layer Llama
teacher of hidden 64, a hybrid student with MLA, GDN and Mamba2 layers)."""
import pytest
import torch
from conftest import tiny_config

from hylo_lab import HyloForCausalLM
from hylo_lab.distill.ild import TeacherForcedStudent, heldout_kl, teacher_states
from hylo_lab.distill.losses import kl_div


def llama_teacher(num_layers=3, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).double().eval()
    for p in model.parameters():  # larger weights than the 0.02 init, so layers really differ
        p.data.add_(0.05 * torch.randn_like(p))
    return model


def hand_teacher(teacher, ids):
    """x_l from output_hidden_states; h_l and a_l by calling each layer / attention block directly."""
    out = teacher(input_ids=ids, output_hidden_states=True)
    layers = teacher.model.layers
    xs = list(out.hidden_states[: len(layers)])
    pos = torch.arange(ids.shape[1])[None]
    pe = teacher.model.rotary_emb(xs[0], pos)
    hs = [layer(x, attention_mask=None, position_embeddings=pe) for layer, x in zip(layers, xs)]
    hs = [h[0] if isinstance(h, tuple) else h for h in hs]
    assert all(torch.allclose(h, x) for h, x in zip(hs[:-1], xs[1:]))  # layer l's output is layer l+1's input
    attn = [layer.self_attn(layer.input_layernorm(x), attention_mask=None, position_embeddings=pe)[0]
            for layer, x in zip(layers, xs)]
    return xs, hs, attn


@pytest.mark.parametrize("squared", [False, True], ids=["l2", "squared"])
def test_teacher_forced_loss_equals_per_layer_computation_by_hand(squared):
    teacher = llama_teacher()
    student = HyloForCausalLM(tiny_config(["mla", "gdn", "mamba2"])).double()
    ids = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        xs, hs, attn = hand_teacher(teacher, ids)
    states = teacher_states(teacher, ids)
    for got, want in ((states.inputs, xs), (states.outputs, hs), (states.mixer_outputs, attn)):
        assert all(torch.allclose(g, w, atol=1e-12) for g, w in zip(got, want))

    rope = student.model.rope_tables(torch.arange(21)[None].expand(2, 21), torch.float64)
    expected = 0.0
    for layer, x, h_t, a_t in zip(student.model.layers, xs, hs, attn):  # the student layer on the TEACHER's input
        xn = layer.input_layernorm(x)
        a = layer.mixer(xn, rope=rope["mla"]) if layer.mixer_type == "mla" else layer.mixer(xn)
        h = x + a
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        d_h, d_a = (h - h_t).norm(dim=-1), (a - a_t).norm(dim=-1)
        if squared:
            d_h, d_a = d_h**2, d_a**2
        expected = expected + d_h.mean() + 0.5 * d_a.mean()
    expected.backward()
    want_grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()

    wrapper = TeacherForcedStudent(student, mixer_weight=0.5, squared=squared)
    loss, parts = wrapper(states)
    assert torch.allclose(loss, expected, rtol=1e-10, atol=1e-12)
    assert parts["layer"].shape == parts["mixer"].shape == (3,)
    loss.backward()
    got_grads = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    assert got_grads.keys() == want_grads.keys()
    assert all(torch.allclose(got_grads[n], want_grads[n], rtol=1e-8, atol=1e-12) for n in want_grads)
    # Embeddings, final norm and head take no part in teacher-forced ILD.
    assert not any(n.startswith(("model.embed_tokens", "model.norm", "lm_head")) for n in got_grads)
    assert all(n in got_grads for n, _ in student.model.layers.named_parameters(prefix="model.layers"))


def test_attention_copy_of_the_teacher_has_zero_ild_loss_and_zero_heldout_kl():
    """A student whose layers are the teacher's own attention layers (weights copied) reproduces every
    teacher tensor: the hooks capture the tensors the loss needs, in the right order."""
    teacher = llama_teacher(num_layers=2)
    student = HyloForCausalLM(tiny_config(["attention", "attention"], rope_parameters=dict(
        rope_type="default", rope_theta=teacher.config.rope_parameters["rope_theta"]))).double()
    state = {k.replace("self_attn", "mixer"): v for k, v in teacher.state_dict().items()}
    missing, unexpected = student.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k or "inv_freq" in k for k in missing)
    ids = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(2))
    states = teacher_states(teacher, ids)
    loss, parts = TeacherForcedStudent(student)(states)
    # Not exactly 0: both RoPE tables are float32 (inv_freq rounded differently), ~1e-8 against O(1) otherwise.
    assert loss.item() < 1e-6 and parts["mixer"].max().item() < 1e-6
    with torch.no_grad():
        t_out = teacher.model(input_ids=ids)
        kl_sum, n = heldout_kl(student, ids, t_out.last_hidden_state, teacher.lm_head.weight, chunk_size=5)
    assert n.item() == ids.numel() and abs(kl_sum.item()) < 1e-9 * n.item()

    other = HyloForCausalLM(tiny_config(["mla", "gdn"])).double()
    with torch.no_grad():
        kl_sum, n = heldout_kl(other, ids, t_out.last_hidden_state, teacher.lm_head.weight, chunk_size=5)
        plain = kl_div(other(ids).logits, teacher(ids).logits)
    assert torch.allclose(kl_sum / n, plain.double(), rtol=1e-6)


def test_layer_count_mismatch_is_refused():
    teacher = llama_teacher(num_layers=2)
    student = HyloForCausalLM(tiny_config(["mla", "gdn", "mla"])).double()
    states = teacher_states(teacher, torch.randint(0, 97, (1, 8)))
    with pytest.raises(ValueError, match="student has 3 layers, teacher 2"):
        TeacherForcedStudent(student)(states)
