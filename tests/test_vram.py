"""GPU memory and host-sync behaviour, proven on the CPU: byte counts through autograd graphs and
saved-tensor hooks, device/dtype assertions inside callbacks, FLOP counts, a sync counter."""
from __future__ import annotations

import pytest
import torch

from library.lora.network import ADAPTER
from library.models.fp8 import store_in_fp8
from library.train.diffusion import step_generator
from library.utils.memory import SavedTensors, graph_saved_bytes
from tests.helpers import first_batch, random_lora_file, tiny_trainer


def apt_trainer(tmp_path, tiny_models, images, *overrides, model="sdxl", **training):
    return tiny_trainer(tmp_path, tiny_models[model], images, ("apt", "true"), *overrides, **training)


def spread_lora(trainer) -> None:
    """Non-zero, deterministic LoRA up-weights: the tuned pass differs from the reference."""
    with torch.no_grad():
        for _, layer in trainer.parts.network.layers.values():
            w = layer.lora_B[ADAPTER].weight
            w.copy_(torch.linspace(-0.05, 0.05, w.numel()).reshape(w.shape))


def recorded(rec) -> list[torch.Tensor]:
    return list(rec.maps.values()) + [t for pairs in rec.features.values() for pair in pairs for t in pair]


# --- finding 1: the recorder under gradient checkpointing -------------------------------------

def test_checkpointed_backward_leaves_nothing_alive_in_the_recorder(tmp_path, tiny_models, images):
    trainer = apt_trainer(tmp_path, tiny_models, images, ("gradient_checkpointing", "true"))
    spread_lora(trainer)
    method = trainer.parts.method
    rec = method.controller.recorder
    batch = first_batch(trainer)
    result = trainer.parts.denoiser.loss(batch, step_generator(0, 0, 0), method.step(batch, 0))
    first = {key: id(t) for key, t in rec.maps.items()}
    assert len(first) > 0
    result.loss.backward()
    method.after_backward()
    # The block reruns of checkpointing recorded nothing: the maps are still the first run's, and
    # the graphs behind everything recorded hold no saved tensor any more (the rerun's would).
    assert {key: id(t) for key, t in rec.maps.items()} == first
    assert graph_saved_bytes(recorded(rec)) == 0


def test_recorder_keeps_the_first_recording_of_a_pass_until_cleared():
    from library.apt.attention import Recorder, RecordingAttnProcessor
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(8, cross_attention_dim=6, heads=2, dim_head=4)
    rec = Recorder()
    attn.set_processor(RecordingAttnProcessor(rec, "layer", record_maps="probs"))
    x, ctx = torch.randn(1, 5, 8), torch.randn(1, 3, 6)
    with rec.recording("tuned"):
        attn(x, ctx)
        kept = rec.maps[("layer", "tuned")]
        attn(x * 2, ctx)  # what a checkpointed rerun does
        assert rec.maps[("layer", "tuned")] is kept
    rec.clear()
    with rec.recording("tuned"):
        attn(x * 2, ctx)
    assert not torch.equal(rec.maps[("layer", "tuned")], kept)


def test_apt_regulariser_gradients_are_the_same_with_checkpointing(tmp_path, tiny_models, images):
    grads = []
    for checkpointing in ("false", "true"):
        folder = tmp_path / checkpointing
        folder.mkdir()
        trainer = apt_trainer(folder, tiny_models, images, ("gradient_checkpointing", checkpointing))
        spread_lora(trainer)
        method = trainer.parts.method
        batch = first_batch(trainer)
        with SavedTensors() as saved:
            trainer.parts.denoiser.loss(batch, step_generator(0, 0, 0), method.step(batch, 0))
        ids = trainer.parts.denoiser.conditioning.tokenize(batch.captions)[0]
        terms = method.controller.regularisers(ids)
        assert terms.l_attn > 0 and terms.l_mu > 0
        trainer.parts.optimizer.zero_grad(set_to_none=True)
        terms.total(1.0, 1.0).backward()
        method.after_backward()
        grads.append({n: p.grad.clone() for n, p in trainer.parts.bundle.unet.named_parameters()
                      if p.grad is not None})
        grads[-1]["saved"] = torch.tensor(float(saved.bytes))
    plain, checkpointed = grads
    assert checkpointed["saved"] < plain["saved"]  # checkpointing is on in the second run
    assert plain.keys() == checkpointed.keys() and len(plain) > 1
    for name in plain:
        if name != "saved":
            assert torch.allclose(plain[name], checkpointed[name], atol=1e-7, rtol=1e-4), name


# --- finding 2: latent caching holds the VAE alone on the device -------------------------------

def test_latent_caching_runs_with_only_the_vae_on_the_device(tmp_path, tiny_models, images, monkeypatch):
    from library.data.latent_cache import LatentCache
    from library.train import builder

    events = []  # (model class, device asked for) per Module.to call, and the phases between them
    original_to = torch.nn.Module.to

    def to(self, *args, **kwargs):
        device = kwargs.get("device") or next((a for a in args if isinstance(a, (str, torch.device))), None)
        if type(self).__name__ in ("UNet2DConditionModel", "AutoencoderKL", "CLIPTextModel",
                                   "CLIPTextModelWithProjection"):
            events.append((type(self).__name__, None if device is None else str(device)))
        return original_to(self, *args, **kwargs)

    models = {}
    original_fill = LatentCache.fill

    def fill(self, progress=None):
        unet = models["unet"]
        assert next(unet.parameters()).dtype == torch.bfloat16  # already in the run's dtype
        events.append(("fill", None))
        return original_fill(self, progress)

    original_load = builder.load_models

    def load(*args, **kwargs):
        bundle = original_load(*args, **kwargs)
        models["unet"] = bundle.unet
        return bundle

    monkeypatch.setattr(torch.nn.Module, "to", to)
    monkeypatch.setattr(LatentCache, "fill", fill)
    monkeypatch.setattr(builder, "load_models", load)
    monkeypatch.setattr(builder, "release_cached_memory", lambda device: events.append(("release", str(device))))
    trainer = tiny_trainer(tmp_path, tiny_models["sdxl"], images, ("cache_latents", "true"),
                           ("mixed_precision", "bf16"))
    device = str(trainer.parts.device)
    fill_at = events.index(("fill", None))
    before, after = events[:fill_at], events[fill_at + 1:]
    # Before and while caching: the VAE went to the device; the others were only cast.
    assert ("AutoencoderKL", device) in before
    assert [e for e in before if e[0] != "AutoencoderKL" and e[1] is not None] == []
    # After: the VAE leaves, the cached blocks are released, then the others arrive.
    assert after[:2] == [("AutoencoderKL", "cpu"), ("release", device)]
    arrived = {name for name, dev in after[2:] if dev == device}
    assert {"UNet2DConditionModel", "CLIPTextModel", "CLIPTextModelWithProjection"} <= arrived
    assert next(trainer.parts.bundle.unet.parameters()).device == trainer.parts.device


def test_release_cached_memory_empties_the_cuda_cache_only_on_cuda(monkeypatch):
    from library.train.builder import release_cached_memory

    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    release_cached_memory(torch.device("cpu"))
    assert calls == []
    release_cached_memory(torch.device("cuda", 0))
    assert calls == [1]


# --- finding 3: tools/sample_lora.py keeps no weight copies it does not need ------------------

def tensor_bytes(obj, skip: set[int], seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensor storages reachable from `obj`'s attributes and containers,
    leaving out the storages in `skip` (the model's own)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        ptr = obj.untyped_storage().data_ptr()
        if ptr in skip:
            return 0
        skip.add(ptr)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, torch.nn.Module):
        return 0  # the model's layers
    if isinstance(obj, dict):
        return sum(tensor_bytes(k, skip, seen) + tensor_bytes(v, skip, seen) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set)):
        return sum(tensor_bytes(v, skip, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return tensor_bytes(vars(obj), skip, seen)
    return 0


@pytest.mark.parametrize("compare_base", [False, True])
def test_sample_lora_holds_at_most_one_run_dtype_copy_of_the_changed_weights(tmp_path, tiny_models, monkeypatch,
                                                                              compare_base):
    from library.lora import apply
    from library.lora.network import NetworkSpec
    from tools import sample_lora

    bundle, lora = random_lora_file(tiny_models["sd15"], tmp_path / "l.safetensors", NetworkSpec(dim=2, alpha=2.0))
    made = []
    original = apply.MergedLoras.__init__

    def init(self, components, *args, **kwargs):
        original(self, components, *args, **kwargs)
        made.append((self, components))

    monkeypatch.setattr(apply.MergedLoras, "__init__", init)
    out = tmp_path / "out"
    argv = ["--model", str(tiny_models["sd15"]), "--lora", str(lora), "--prompts", "a red circle --d 5 --s 2",
            "--size", "64", "--out", str(out), "--name", "x", "--sampler", "ddim", "--precision", "bf16"]
    assert sample_lora.main(argv + (["--compare_base"] if compare_base else [])) == 0
    merged, components = made[0]
    model = {p.untyped_storage().data_ptr() for m in components.values() for p in m.parameters()}
    changed = sum(layer.weight.numel() for layer in merged.layers.values())
    assert changed > 0
    held = tensor_bytes(merged, set(model))
    # Today's merger kept two fp32 copies (8 bytes per changed weight) whatever the flags.
    assert held == (changed * 2 if compare_base else 0)  # bf16: one copy, only to switch
    assert (out / "x_00_5.png").is_file() and (out / "x_00_5_base.png").is_file() == compare_base


# --- finding 5: LoHa / LoKr run one full-size matmul per layer, as LoRA does -------------------

def adapted(kind: str, conv: bool, seed: int = 0):
    """A one-layer model with a peft adapter of `kind` and non-zero factors."""
    import peft

    torch.manual_seed(seed)
    base = torch.nn.Conv2d(32, 48, 3, padding=1) if conv else torch.nn.Linear(64, 96)
    model = torch.nn.Sequential(base)
    config = {"lora": peft.LoraConfig(r=4, lora_alpha=4, target_modules=["0"]),
              "loha": peft.LoHaConfig(r=4, alpha=4, target_modules=["0"]),
              "lokr": peft.LoKrConfig(r=4, alpha=4, target_modules=["0"], decompose_factor=8)}[kind]
    peft.inject_adapter_in_model(config, model, adapter_name="default")
    for name, p in model.named_parameters():
        if "base_layer" in name:
            p.requires_grad_(False)
        else:
            with torch.no_grad():
                p.normal_(0, 0.3)
    return model


def step_of(model, x):
    from torch.utils.flop_counter import FlopCounterMode

    x = x.clone().requires_grad_()  # inside a network, a layer's input needs its gradient
    with FlopCounterMode(display=False) as flops, SavedTensors() as saved:
        out = model(x)
        out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["input"] = x.grad
    return out.detach(), grads, flops.get_total_flops(), saved.bytes


@pytest.mark.parametrize("kind", ["loha", "lokr"])
@pytest.mark.parametrize("conv", [False, True])
def test_whole_weight_adapters_match_peft_with_one_matmul(kind, conv):
    from library.lora.fused import fuse_whole_delta

    x = torch.randn(2, 32, 16, 16) if conv else torch.randn(2, 512, 64)
    reference = step_of(adapted(kind, conv), x)
    model = adapted(kind, conv)
    assert fuse_whole_delta(model[0])
    fused = step_of(model, x)
    lora = step_of(adapted("lora", conv), x)
    assert torch.allclose(fused[0], reference[0], atol=1e-5, rtol=1e-4)
    assert fused[1].keys() == reference[1].keys() and len(fused[1]) >= 3
    for name in fused[1]:
        assert torch.allclose(fused[1][name], reference[1][name], atol=1e-5, rtol=1e-4), name
    # peft: base + delta forward, two input gradients and delta_W's: 5 full-size products against
    # LoRA's 2 (and delta_W saved). Fused: 3 (the weight gradient any whole-weight adapter needs).
    # Measured: peft 2.16-2.21x LoRA's FLOPs, fused 1.30-1.34x.
    assert reference[2] > 2.0 * lora[2]
    assert fused[2] < 1.4 * lora[2]
    assert fused[3] <= lora[3]  # and saves no more than LoRA for backward
    weight = model[0].get_base_layer().weight
    assert reference[3] - fused[3] >= weight.numel() * 4  # delta_W (fp32) is not saved for backward
    assert fuse_whole_delta(adapted("lora", conv)[0]) is False


def test_fused_layer_falls_back_to_peft_when_adapters_are_off():
    from library.lora.fused import fuse_whole_delta

    model, plain = adapted("loha", False), adapted("loha", False)
    fuse_whole_delta(model[0])
    x = torch.randn(3, 64)
    model[0].enable_adapters(False)
    assert torch.equal(model(x), model[0].get_base_layer()(x))
    model[0].enable_adapters(True)
    assert torch.allclose(model(x), plain(x), atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = model(x), plain(x)
    assert out.dtype == ref.dtype == torch.float32 and torch.allclose(out, ref, atol=0.05, rtol=0.02)


# --- finding 10: host synchronisations per step -----------------------------------------------

def step_reads(trainer, step: int):
    from library.utils.syncs import HostReads

    bundle = trainer.parts.bundle
    with HostReads([bundle.unet, *bundle.text_encoders]) as reads:
        assert trainer.train_step(step) is not None
    return reads


def test_host_reads_count_device_values_only():
    from library.utils.syncs import HostReads

    model = torch.nn.Linear(3, 2)
    with HostReads([model]) as reads:
        host = torch.arange(4)
        host.tolist(), int(host[0])  # host values: no synchronisation on a GPU either
        out = model(torch.ones(1, 3)).sum()
        out.item(), bool(out > 0), out.detach().to("cpu")
        out.backward()
        float(model.weight.grad.norm())
    assert reads.count == 4, reads.where


@pytest.mark.parametrize("apt", [False, True])
def test_a_training_step_reads_the_device_at_most_three_times(tmp_path, tiny_models, images, apt):
    trainer = tiny_trainer(tmp_path, tiny_models["sd15"], images, ("apt", str(apt).lower()),
                           ("cache_latents", "true"), max_train_steps=2)
    reference = step_reads(trainer, 0)  # APT's reference pass runs at step 0 (reference_every = 4)
    other = step_reads(trainer, 1)
    # Plain: the loss with the per-sample losses, and the gradient norm. APT adds one read of its
    # statistics (with the reference pass's losses and the regularisers' finiteness).
    limit = 3 if apt else 2
    assert reference.count <= limit, reference.where
    assert other.count <= limit, other.where


# --- finding 4: loading under several processes -----------------------------------------------

@pytest.mark.parametrize("rank", [0, 1, 2])
def test_the_processes_of_a_machine_load_one_at_a_time(monkeypatch, rank):
    from types import SimpleNamespace

    from library.train.builder import in_turns

    events = []
    acc = SimpleNamespace(num_processes=3, local_process_index=rank, wait_for_everyone=lambda: events.append("wait"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert in_turns(acc, lambda: events.append("load") or "bundle") == "bundle"
    # Process r loads after r rounds of waiting, while the others wait for it.
    assert events == ["wait"] * rank + ["load"] + ["wait"] * (3 - rank)
    events.clear()
    assert in_turns(SimpleNamespace(num_processes=1, local_process_index=0, wait_for_everyone=None),
                    lambda: "alone") == "alone"


@pytest.mark.parametrize("no_half_vae,expected", [("false", torch.bfloat16), ("true", torch.float32)])
def test_the_model_loads_in_the_run_dtype_unless_the_vae_needs_fp32(tmp_path, tiny_models, images, monkeypatch,
                                                                     no_half_vae, expected):
    from library.train import builder

    loaded = []
    original = builder.load_models
    monkeypatch.setattr(builder, "load_models",
                        lambda opts, plan=None, dtype=None: loaded.append(dtype) or original(opts, plan, dtype))
    trainer = tiny_trainer(tmp_path, tiny_models["sd15"], images, ("mixed_precision", "bf16"),
                           ("no_half_vae", no_half_vae))
    assert loaded == [expected]
    vae = trainer.parts.bundle.vae
    assert next(vae.parameters()).dtype == (torch.float32 if no_half_vae == "true" else torch.bfloat16)
    assert next(trainer.parts.bundle.unet.parameters()).dtype == torch.bfloat16


# --- finding 7: APT's recordings keep no fp32 copies for backward ------------------------------

def reference_maps(query, key, scale, mask, probabilities):
    logits = (query.float() @ key.float().transpose(-1, -2)) * scale
    if mask is not None:
        logits = logits + mask.float()
    return (logits.softmax(-1) if probabilities else logits).mean(1)


@pytest.mark.parametrize("probabilities", [True, False])
def test_attention_maps_and_channel_stats_have_autograd_gradients(probabilities):
    from library.apt.attention import attention_maps, channel_stats

    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 7, 4, requires_grad=True), torch.randn(2, 3, 5, 4, requires_grad=True)
    mask = torch.zeros(2, 1, 1, 5)
    mask[:, :, :, -1] = -1e4
    weights = torch.randn(2, 7, 5)
    ours = attention_maps(q, k, 0.5, mask, probabilities)
    theirs = reference_maps(q, k, 0.5, mask, probabilities)
    assert torch.equal(ours, theirs)
    g_ours = torch.autograd.grad((ours * weights).sum(), (q, k))
    g_theirs = torch.autograd.grad((theirs * weights).sum(), (q, k))
    for a, b in zip(g_ours, g_theirs):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    x = torch.randn(2, 9, 6, requires_grad=True)
    with torch.no_grad():
        x[:, :, 0] = 1.5  # a constant channel: std 0
    mu, sd = channel_stats(x)
    assert torch.allclose(mu, x.mean(1)) and torch.allclose(sd, x.std(1, unbiased=False))
    a, b = torch.randn(2, 6), torch.randn(2, 6)
    g = torch.autograd.grad((mu * a + sd * b).sum(), x)[0]
    # autograd's std gradient of a constant channel is 0/0; ours is 0 there
    expected = torch.autograd.grad((x.mean(1) * a).sum() + (x[:, :, 1:].std(1, unbiased=False) * b[:, 1:]).sum(),
                                   x)[0]
    assert torch.allclose(g, expected, atol=1e-6)


@pytest.mark.parametrize("features", ["output", "qkv"])
def test_recording_saves_no_fp32_copies_under_bf16_autocast(features):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from library.apt.attention import Recorder, RecordingAttnProcessor

    torch.manual_seed(0)
    cross = Attention(64, cross_attention_dim=32, heads=4, dim_head=16).to(torch.bfloat16)
    selfa = Attention(64, heads=4, dim_head=16).to(torch.bfloat16)
    for layer in (cross, selfa):
        layer.to_q.weight.requires_grad_(True)  # a trained adapter's place: gradients flow
    x = torch.randn(2, 256, 64, dtype=torch.bfloat16, requires_grad=True)
    ctx = torch.randn(2, 77, 32, dtype=torch.bfloat16)
    rec = Recorder()

    def saved(processors):
        cross.set_processor(processors[0])
        selfa.set_processor(processors[1])
        with torch.autocast("cpu", dtype=torch.bfloat16), rec.recording("tuned"), SavedTensors() as s:
            selfa(cross(x, ctx))
        rec.clear()
        return s

    stock = saved([AttnProcessor2_0(), AttnProcessor2_0()])
    recording = saved([RecordingAttnProcessor(rec, "c", record_maps="probs"),
                       RecordingAttnProcessor(rec, "s", record_features=features)])
    extra = recording.bytes - stock.bytes
    # What may be added: the maps' and statistics' own small outputs. An fp32 copy of the query
    # alone would be 2 x 256 x 64 x 4 bytes (131 kB); the softmax per head 2 x 4 x 256 x 77 x 4.
    assert extra <= 2 * 256 * 77 * 4 + 6 * 2 * 64 * 4, (extra, recording.by_dtype, stock.by_dtype)
    assert recording.by_dtype.get(torch.float32, 0) <= 2 * 256 * 77 * 4 + 6 * 2 * 64 * 4


# --- finding 6: no second copy of a LoRA layer's input under autocast --------------------------

def test_lora_under_autocast_saves_no_copy_of_the_input(tmp_path, tiny_models):
    from library.config.options import ModelOptions
    from library.lora.network import LoraNetwork, NetworkSpec
    from library.models.loader import load_models

    bundle = load_models(ModelOptions(pretrained_model_name_or_path=str(tiny_models["sd15"])), dtype=torch.bfloat16)
    spec = NetworkSpec(dim=2, alpha=2.0, train_text_encoders=False)
    network = LoraNetwork(bundle.unet, bundle.text_encoders, bundle.arch, spec)
    attn = bundle.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    x = torch.randn(2, 300, attn.to_q.get_base_layer().in_features, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), SavedTensors() as saved:
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    assert all(t.dtype == torch.bfloat16 for t in (q, k, v))
    # The three adapters keep x itself for their gradients, and their rank-2 tensors. peft's cast
    # made an fp32 copy of x per layer, and autocast a bf16 copy of that, saved: 3 x 2 x 300 x C x 2.
    assert saved.bytes_besides(x) < x.numel() * 2, saved.by_dtype  # measured: 14 kB against 129 kB
    assert network.layers  # (the network is what changed the layers)


# --- finding 8: reserved memory and the phases between steps are reported ----------------------

def test_memory_metrics_report_reserved_and_the_whole_run(monkeypatch):
    from library.train.metrics import MemoryPeaks, StepReport

    gib = 2 ** 30
    alloc = {"now": 2 * gib, "peak": 2 * gib, "reserved": 3 * gib, "reserved_peak": 3 * gib}

    def use(n, reserved):
        alloc["peak"] = max(alloc["peak"], alloc["now"] + n * gib)
        alloc["reserved_peak"] = max(alloc["reserved_peak"], reserved * gib)

    def reset(device=None):
        alloc["peak"], alloc["reserved_peak"] = alloc["now"], alloc["reserved"]

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: alloc["peak"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: alloc["reserved_peak"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 16 * gib))
    source = MemoryPeaks(torch.device("cuda", 0))
    report = StepReport(1, 1, 0.1, 1.0, 1.0, 1)
    use(9, 12)  # latent caching before the first step
    source.start_step()
    use(3, 6)
    first = source(report)
    assert first["peak_memory_gib"] == 5.0 and first["peak_reserved_gib"] == 6.0
    assert first["peak_memory_whole_run_gib"] == 11.0 and first["peak_reserved_whole_run_gib"] == 12.0
    assert first["device_memory_used_gib"] == 6.0  # context and other processes included
    use(10, 14)  # a sample round between steps
    source.start_step()
    use(1, 4)
    second = source(report)
    assert second["peak_memory_gib"] == 3.0 and second["peak_memory_run_gib"] == 5.0
    assert second["peak_memory_whole_run_gib"] == 12.0 and second["peak_reserved_whole_run_gib"] == 14.0
    assert MemoryPeaks(torch.device("cpu"))(report).keys() == {"peak_memory_gib", "peak_memory_run_gib"}


# --- finding 12: DDP's unused-parameter search, validation chunks, TF32 ------------------------

def test_only_the_text_encoders_wrappers_search_for_unused_parameters(tmp_path, tiny_models, images, monkeypatch):
    from accelerate import Accelerator

    seen = []
    original = Accelerator.prepare

    def prepare(self, *objects):
        seen.append(([type(o).__name__ for o in objects], self.ddp_handler.find_unused_parameters))
        return original(self, *objects)

    monkeypatch.setattr(Accelerator, "prepare", prepare)
    trainer = tiny_trainer(tmp_path, tiny_models["sdxl"], images, ("network_train_unet_only", "false"),
                           train_batch_size=1)
    assert seen[:3] == [(["UNet2DConditionModel"], False), (["CLIPTextModel"], True),
                        (["CLIPTextModelWithProjection"], True)]
    assert len(seen) == 4 and len(seen[3][0]) == 1  # then the optimizer
    assert trainer.parts.accelerator.ddp_handler.find_unused_parameters is True  # as configured
    assert trainer.parts.validator.batch_size == 1  # uncached validation encodes one training batch at a time


def test_tf32_is_used_by_fp32_gpu_runs_only():
    from library.train.setup import use_tf32

    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32
    try:
        matmul.allow_tf32 = cudnn.allow_tf32 = False
        assert not use_tf32(torch.device("cpu"), "no")
        assert not use_tf32(torch.device("cuda", 0), "bf16") and not matmul.allow_tf32
        assert use_tf32(torch.device("cuda", 0), "no")
        assert matmul.allow_tf32 and cudnn.allow_tf32
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before


# --- bench/memory_estimate.py: counting on the meta device equals counting a real forward ------

@pytest.mark.parametrize("apt,fp8", [(False, False), (True, False), (True, True)])
def test_meta_device_count_equals_a_real_cpu_forward(apt, fp8):
    from diffusers import UNet2DConditionModel

    from library.apt.controller import AptController
    from library.config.options import AptOptions
    from library.lora.network import LoraNetwork, NetworkSpec
    from library.models import shipped
    from library.models.families import get_family
    from library.train import memory_estimate as me

    family = get_family(shipped.SHIPPED_TREES["tiny_sdxl"])
    config = shipped.read_json(shipped.tree("tiny_sdxl") / "unet" / "config.json")
    counts = []
    for device in ("meta", "cpu"):
        if device == "meta":
            unet = me.meta_denoiser(config, torch.float32)
        else:
            torch.manual_seed(0)
            unet = UNet2DConditionModel.from_config(config).requires_grad_(False)
        if fp8:  # fp8_base: stored in float8 on the meta device as on the CPU
            store_in_fp8(unet)
        network = LoraNetwork(unet, [], family, NetworkSpec(dim=4, alpha=2.0))
        recorder = None
        if apt:
            controller = AptController(AptOptions(), family.attention_layers(unet), 1000)
            family.set_attention_processors(unet, {**family.attention_processors(unet), **controller.processors})
            recorder = controller.recorder
        inputs = me.step_inputs(unet, 2, (8, 8), torch.float32, device=device)
        with me.flash_like_attention():
            full = me.activations(family, unet, inputs, False, recorder, network.set_enabled)
            ckpt = me.activations(family, unet, inputs, True, recorder, network.set_enabled)
        counts.append((full, ckpt, sum(p.numel() for p in network.parameters()),
                       sum(p.numel() * p.element_size() for p in unet.parameters())))
    assert counts[0] == counts[1]
    (full, ckpt, _, _), _ = counts
    assert 0 < ckpt["saved"] < full["saved"] and 0 < full["largest_block"] < full["saved"]
    assert (full["recorded"] > 0) == apt


def test_flash_like_attention_saves_linear_memory_in_the_positions():
    from library.train.memory_estimate import flash_like_attention

    sizes = []
    for n in (256, 1024):
        q = torch.zeros(1, 2, n, 8, device="meta", requires_grad=True)
        with flash_like_attention(), SavedTensors() as saved:
            out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        assert out.shape == q.shape
        sizes.append(saved.bytes)
    assert sizes[1] == 4 * sizes[0]  # the math path would save an n x n matrix: 16x


# --- finding 11: sample images can be decoded in tiles -----------------------------------------

def test_sample_decode_tiles_large_images_only_when_asked(monkeypatch):
    import numpy as np

    from library.models.tiny import build_tiny_pipeline
    from library.train import sampling

    pipe = build_tiny_pipeline("sd1", seed=0)
    vae, scale = pipe.vae, pipe.vae_scale_factor
    before = vae.tile_sample_min_size, vae.tile_latent_min_size
    seen = []
    original = type(vae).tiled_decode

    def tiled(self, z, return_dict=True):
        seen.append((self.tile_sample_min_size, self.tile_latent_min_size, tuple(z.shape[-2:])))
        return original(self, z, return_dict)

    monkeypatch.setattr(type(vae), "tiled_decode", tiled)
    torch.manual_seed(0)
    big = torch.randn(1, vae.config.latent_channels, 640 // scale, 640 // scale)
    plain = np.asarray(sampling.decode(pipe, big)[0], dtype=np.float32)
    assert seen == []
    tiles = np.asarray(sampling.decode(pipe, big, tiled=True)[0], dtype=np.float32)
    assert seen == [(sampling.TILE_PX, sampling.TILE_PX // scale, big.shape[-2:])]
    assert (vae.tile_sample_min_size, vae.tile_latent_min_size) == before  # the VAE as it was
    assert tiles.shape == plain.shape == (640, 640, 3)
    assert np.abs(tiles - plain).mean() < 0.1 * 255  # the same picture, up to the blended seams
    small = torch.randn(1, vae.config.latent_channels, 64 // scale, 64 // scale)
    assert np.array_equal(np.asarray(sampling.decode(pipe, small, tiled=True)[0]),
                          np.asarray(sampling.decode(pipe, small)[0]))
    assert len(seen) == 1


def test_samples_encode_prompts_with_the_text_encoders_alone_and_decode_with_the_vae_alone(
        tmp_path, tiny_models, images, monkeypatch):
    from contextlib import contextmanager

    from library.train import sampling

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --s 2 --d 1\na blue square --s 2 --d 2\n")
    trainer = tiny_trainer(tmp_path, tiny_models["sdxl"], images, ("sample_prompts", str(prompts)),
                           ("sample_every_n_steps", "1"), max_train_steps=1)
    bundle = trainer.parts.bundle
    names = {id(bundle.vae): "vae", **{id(te): f"te{i}" for i, te in enumerate(bundle.text_encoders)}}
    active: list[set] = []
    seen = {"encode": [], "decode": []}
    real_on_device, real_kwargs, real_decode = sampling.on_device, sampling.Sampler.prompt_kwargs, sampling.decode

    @contextmanager
    def on_device(modules, device):
        active.append({names[id(m)] for m in modules})
        try:
            with real_on_device(modules, device):
                yield
        finally:
            active.pop()

    def prompt_kwargs(self, p):
        seen["encode"].append(set().union(*active))
        return real_kwargs(self, p)

    def decode(pipe, latents, tiled=False):
        seen["decode"].append(set().union(*active))
        return real_decode(pipe, latents, tiled)

    monkeypatch.setattr(sampling, "on_device", on_device)
    monkeypatch.setattr(sampling.Sampler, "prompt_kwargs", prompt_kwargs)
    monkeypatch.setattr(sampling, "decode", decode)
    trainer.run()
    assert seen["encode"] == [{"te0", "te1"}] * 2  # both prompts, before any image
    assert seen["decode"] == [{"vae"}] * 2
    assert len(list((tmp_path / "out" / "sample").glob("lora_000001_0*.png"))) == 2
