"""GPU check: the full-size LLaVA-1.5-7B, Idefics2-8B and Qwen2.5-VL-7B architectures, random weights, bf16.

No download: each model is built from a config with the real checkpoint's sizes (typed in below, from
the checkpoints' config.json) directly on the GPU, and wrapped in our adapter with a processor of the
real image geometry around the toy world's word-level tokenizer (random weights make any tokenizer
as good as the real one). Per model it then

  1. checks the connector hook: E_pre / E_post shapes per image against the architecture's;
  2. times the extraction path as the stage runs it (conngeo.extraction.extract: PNG files decoded in
     DataLoader workers, batches through adapter.encode) -> images/s;
  3. times greedy generation from the pixels and from the supplied E_post (the captions path) ->
     images/s, and says whether the two give the same tokens (they must, bar bf16 kernel choices);
  4. prints peak GPU memory.

    python benchmarks/gpu_check.py                 # all three, a few minutes on one GPU
    python benchmarks/gpu_check.py --dry-run       # anywhere: configs, parameter counts (meta device),
                                                   # processors and prompt token counts; no GPU needed
    python benchmarks/gpu_check.py --device cpu --max-layers 1 --batch-size 2 --batches 1
                                                   # every step at full width, one layer per tower (~3 min
                                                   # on 2 CPU cores): checks this script, not the speed
"""

import gc
import tempfile
import time
from pathlib import Path

import torch
import typer
from transformers import (Idefics2Config, Idefics2ForConditionalGeneration, LlavaConfig,
                          LlavaForConditionalGeneration, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration)

from conngeo.data import toyworld
from conngeo.data.images import load_image, scan
from conngeo.extraction import extract
from conngeo.models import adapter_class
from conngeo.models.tokenizer import build_tokenizer

app = typer.Typer(add_completion=False)


def llava_config(ids: dict, d=lambda n: n) -> LlavaConfig:
    """llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px, 2-layer MLP, Vicuna-7B (Llama)."""
    return LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=d(24), num_attention_heads=16, image_size=336, patch_size=14,
                           projection_dim=768, hidden_act="quick_gelu"),
        text_config=dict(model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=d(32), num_attention_heads=32, num_key_value_heads=32,
                         max_position_embeddings=4096, rms_norm_eps=1e-5, **ids["text"]),
        image_token_id=ids["<image>"], image_seq_length=576, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default")


def idefics2_config(ids: dict, d=lambda n: n) -> Idefics2Config:
    """HuggingFaceM4/idefics2-8b: SigLIP-so400m at 980 px, perceiver resampler (64 latents), Mistral-7B."""
    return Idefics2Config(
        vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=d(27), num_attention_heads=16,
                           image_size=980, patch_size=14),
        perceiver_config=dict(hidden_size=4096, resampler_n_latents=64, resampler_depth=d(3), resampler_n_heads=16,
                              resampler_head_dim=96, num_key_value_heads=4),
        text_config=dict(model_type="mistral", vocab_size=32003, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=d(32), num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=32768, rms_norm_eps=1e-5, **ids["text"]),
        image_token_id=ids["<image>"])


def qwen2_5vl_config(ids: dict, d=lambda n: n) -> Qwen2_5_VLConfig:
    """Qwen/Qwen2.5-VL-7B-Instruct: windowed ViT (32 blocks, 4 full), 2x2 patch merger, Qwen2-7B."""
    return Qwen2_5_VLConfig(
        vision_config=dict(depth=d(32), hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=3584,
                           fullatt_block_indexes=[i for i in (7, 15, 23, 31) if i < d(32)] or [d(32) - 1], hidden_act="silu"),
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=d(28),
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                         rms_norm_eps=1e-6, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [16, 24, 24]}, **ids["text"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


# The builders' `d` caps each tower's depth (--max-layers, a quick off-GPU check of this script).
# family -> (config builder, model class, image size, processor kwargs for the adapter's tiny(),
#            expected (E_pre, E_post) shape per image)
ARCHS = {
    "llava": (llava_config, LlavaForConditionalGeneration, 336, {"patch_size": 14}, ((576, 1024), (576, 4096))),
    "idefics2": (idefics2_config, Idefics2ForConditionalGeneration, 980, {"patch_size": 14, "latents": 64},
                 ((4900, 1152), (64, 4096))),
    "qwen2.5vl": (qwen2_5vl_config, Qwen2_5_VLForConditionalGeneration, 448, {"patch_size": 14},
                  ((1024, 1280), (256, 3584))),
}
NAMES = {"llava": "LLaVA-1.5-7B", "idefics2": "Idefics2-8B", "qwen2.5vl": "Qwen2.5-VL-7B"}


def build(family: str, device: str, dtype: torch.dtype, max_layers: int | None = None):
    """(adapter, model's parameter count, the tiny CPU adapter whose processor it borrowed): the
    full-size model with random weights on `device`."""
    make_config, model_class, image_size, tiny_kwargs, _ = ARCHS[family]
    cls = adapter_class(family)
    tokenizer = build_tokenizer(toyworld.vocabulary(), cls.special_tokens)
    # the adapter's own processor for this image geometry (its tiny model is small and thrown away)
    tiny = cls.tiny(tokenizer, image_size, **tiny_kwargs)
    processor = tiny.processor
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in cls.special_tokens}
    ids["text"] = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = make_config(ids, d=lambda n: min(n, max_layers or n))
    # parameters are created (and randomly initialised) where they live: no 15 GB CPU copy
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype, attn_implementation="sdpa")
    settings = model.generation_config
    settings.bos_token_id, settings.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    settings.pad_token_id = tokenizer.pad_token_id
    # random weights rarely say eos, but a fixed length makes the timing comparable across models
    settings.eos_token_id = None
    return cls(model, processor), sum(p.numel() for p in model.parameters()), tiny


def toy_images(n: int, size: int):
    return [toyworld.make_image(0, "study", 0, i, size)[1] for i in range(n)]


@app.command()
def main(
    families: list[str] = typer.Option(list(ARCHS), "--family", help="llava, idefics2, qwen2.5vl (repeatable)"),
    batch_size: int = typer.Option(8, help="images per batch"),
    batches: int = typer.Option(4, help="timed batches per path (after one warm-up batch)"),
    new_tokens: int = typer.Option(16, help="greedy tokens per caption"),
    num_workers: int = typer.Option(4, help="DataLoader workers decoding images in the extraction path"),
    dtype: str = typer.Option("bfloat16", help="bfloat16 or float16"),
    device: str = typer.Option("cuda"),
    dry_run: bool = typer.Option(False, help="no GPU: configs, parameter counts on the meta device, "
                                             "processors and prompt token counts only"),
    max_layers: int = typer.Option(None, help="cap every tower's depth (full widths): with --device cpu, a "
                                              "quick check of this script where there is no GPU"),
):
    """Build each full-size architecture with random weights on one GPU, check the connector hook's
    shapes, and print extraction and generation images/s and peak GPU memory."""
    unknown = sorted(set(families) - set(ARCHS))
    if unknown:
        raise typer.BadParameter(f"unknown families {unknown}; choose from {list(ARCHS)}")
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if dry_run:
        for family in families:
            adapter, params, tiny = build(family, "meta", torch_dtype)
            size, (pre, post) = ARCHS[family][2], ARCHS[family][4]
            prompt = tiny.prepare(toy_images(1, size))  # same processor and token ids, on the CPU
            image_tokens = int((prompt["input_ids"] == adapter.model.config.image_token_id).sum())
            assert image_tokens == post[0], f"{family}: the prompt holds {image_tokens} image tokens, not {post[0]}"
            print(f"{NAMES[family]:14s} {params / 1e9:5.2f} B parameters  {size} px  E_pre {pre}  E_post {post}  "
                  f"prompt {prompt['input_ids'].shape[1]} tokens ({image_tokens} image)  "
                  f"attention {adapter.model.config._attn_implementation}")
        return
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU and a CUDA build of torch (torch.cuda.is_available() is "
                         "False); `--dry-run` checks the configs without one")
    if not cuda and not max_layers:
        raise SystemExit(f"--device {device} runs the full-size models only with --max-layers (a CPU would take hours)")
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    print(f"{torch.cuda.get_device_name(device) if cuda else device}, torch {torch.__version__}, {dtype}, "
          f"batch {batch_size}, {new_tokens} new tokens, {num_workers} DataLoader workers"
          f"{f', towers capped at {max_layers} layers' if max_layers else ''}")
    n = batch_size * batches
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            size, (pre_shape, post_shape) = ARCHS[family][2], ARCHS[family][4]
            root = Path(tmp) / f"world{size}"
            if not root.exists():
                toyworld.generate(root, split="study", seed=0, shards=1, images_per_shard=n + batch_size, size=size)
            items = scan(root).items
            images = [load_image(it.path) for it in items[:batch_size]]
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            adapter, params, _ = build(family, device, torch_dtype, max_layers)
            built = time.perf_counter() - start

            pre, post = adapter.encode(images)  # warm-up, and the hook's shapes
            assert len(pre) == len(post) == batch_size, f"{family}: {len(pre)}/{len(post)} matrices for {batch_size}"
            got = (tuple(pre[0].shape), tuple(post[0].shape))
            assert got == (pre_shape, post_shape), f"{family}: hook shapes {got}, expected {(pre_shape, post_shape)}"
            assert all(torch.isfinite(p).all() for p in pre + post), f"{family}: non-finite E_pre/E_post"

            sync()
            start = time.perf_counter()
            extract(adapter, items[batch_size:], Path(tmp) / family, {"family": family}, batch_size=batch_size,
                    save_every=n, num_workers=num_workers)
            extract_rate = n / (time.perf_counter() - start)

            adapter.generate(images, max_new_tokens=2)  # warm-up
            sync()
            start = time.perf_counter()
            for _ in range(batches):
                native = adapter.generate(images, max_new_tokens=new_tokens)
            native_rate = n / (time.perf_counter() - start)
            start = time.perf_counter()
            for _ in range(batches):
                replay = adapter.generate(images, post=post, max_new_tokens=new_tokens)
            replay_rate = n / (time.perf_counter() - start)

            peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:5.1f} GiB" if cuda else "n/a"
            print(f"{NAMES[family]:14s} {params / 1e9:5.2f} B  built in {built:5.1f} s  hook E_pre {pre_shape} "
                  f"E_post {post_shape} ok  extract {extract_rate:7.1f} img/s  generate {native_rate:6.1f} img/s  "
                  f"from E_post {replay_rate:6.1f} img/s (same captions: {native == replay})  "
                  f"peak {peak}  attention {adapter.model.config._attn_implementation}")
            del adapter, pre, post
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    app()
