"""Scale figures at true Stable Diffusion 1.4 size, random weights, on this CPU (nothing downloaded).

Builds SD-1.4's modules from their configs -- ``UNet2DConditionModel`` (block_out_channels
(320, 640, 1280, 1280), cross_attention_dim 768, 860M parameters), a 12-layer 768-dim
``CLIPTextModel`` (vocabulary 49408, 77 positions) and SD's ``AutoencoderKL`` -- wraps them in a
latent :class:`~unlearn.adapters.image.ImageAdapter` and times:

* UCE: the whole ``uce_erase`` (prompt encoding + the closed form on all 32 ``attn2.to_k`` /
  ``to_v`` matrices) and the closed form alone (``uce_edit_unet``);
* RECE: the editor without validation (UCE + ``--rece-epochs`` adversarial epochs);
* ESD-x: one training step at 64x64 latents, batch 1 (two frozen-model forwards, one forward +
  backward of the trained model, AdamW on attn2) -- without sampling x_t, which costs k guided
  UNet steps (k uniform in 0..ddim_steps-1, so ~10 on average at 20 steps);
* sampling: ONE classifier-free-guided UNet step at 64x64 latents (batch 2: uncond + cond) and one
  VAE decode to 512x512; a 50-step sample is extrapolated as 50 x step + decode (not run);
* peak memory: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after each phase.

The prompts are tokenized by a small word-level tokenizer (ids < 49408): the timings do not
depend on the vocabulary. Run on an otherwise idle machine::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_sd_scale.py --threads 1
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_sd_scale.py --threads 1 --closed-forms-only   # UCE, RECE
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from types import SimpleNamespace

import torch


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # ru_maxrss is KiB on Linux


def build_sd14(smoke: bool = False):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from unlearn.adapters.image import ImageAdapter
    from unlearn.zoo.image_models import build_caption_tokenizer

    words = ["a photo of", "nudity", "naked", "person", "car", "dog", "cat", "painting by van gogh", "art", "tree"]
    tok = build_caption_tokenizer(words, max_length=77)
    torch.manual_seed(0)
    d = 32 if smoke else 768  # --smoke: tiny channels, only checks that the script runs
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=12,
                                      num_attention_heads=4 if smoke else 12, max_position_embeddings=77,
                                      hidden_act="quick_gelu",
                                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id)).eval()
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 32, 64, 64) if smoke else (320, 640, 1280, 1280), norm_num_groups=8 if smoke else 32,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=d,
        attention_head_dim=8).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 16, 16) if smoke else (128, 256, 512, 512),
                        norm_num_groups=8 if smoke else 32, layers_per_block=2, latent_channels=4, sample_size=512,
                        scaling_factor=0.18215).eval()
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          steps_offset=1)
    return ImageAdapter(unet, te, tok, sched, vae=vae, source="random SD-1.4 config")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rece-epochs", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3, help="UCE repeats (median)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--closed-forms-only", action="store_true", help="UCE and RECE only (no sampling, no ESD)")
    ap.add_argument("--smoke", action="store_true", help="tiny channels: check the script runs (figures meaningless)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from unlearn.editors.base import EditContext
    from unlearn.editors.esd import esd_loss
    from unlearn.editors.rece import RECE, RECEConfig
    from unlearn.editors.uce import adapter_concept_embeddings, uce_edit_unet, uce_erase

    res: dict = {"threads": args.threads, "cpu": platform.processor() or platform.machine(),
                 "torch": torch.__version__}
    t0 = time.perf_counter()
    a = build_sd14(args.smoke)
    res["build_s"] = round(time.perf_counter() - t0, 1)
    res["params_M"] = {k: round(sum(p.numel() for p in m.parameters()) / 1e6, 1)
                       for k, m in (("unet", a.unet), ("text_encoder", a.text_encoder), ("vae", a.vae))}
    res["kv_matrices"] = len(a.parameter_groups()["cross_attention_kv"])
    res["peak_gib_after_build"] = round(peak_gib(), 2)
    preserve = ["person", "car", "dog", "cat", "tree", "painting by van gogh"]

    # ---- UCE
    ce = adapter_concept_embeddings(a, ["nudity"])
    cg = adapter_concept_embeddings(a, [""])
    cp = adapter_concept_embeddings(a, [""] + preserve)
    closed, full = [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        uce_edit_unet(a.unet, ce, cg, cp)
        closed.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        uce_erase(a, ["nudity"], [""], preserve)
        full.append(time.perf_counter() - t0)
    res["uce_closed_form_s"] = round(sorted(closed)[len(closed) // 2], 4)
    res["uce_erase_s"] = round(sorted(full)[len(full) // 2], 4)

    # ---- RECE (no validation: no judge)
    data = SimpleNamespace(erase=["object:nudity"], guide=["object:"], preserve_words=lambda: preserve, judge=None)
    t0 = time.perf_counter()
    info = RECE(RECEConfig(epochs=args.rece_epochs)).apply(a, data, EditContext(settings=None, progress=False)).info
    res["rece_apply_s"] = round(time.perf_counter() - t0, 3)
    res["rece_edit_s"] = info["edit_seconds"]
    res["rece_epochs"] = args.rece_epochs
    res["peak_gib_after_closed_forms"] = round(peak_gib(), 2)

    if args.closed_forms_only:
        print(json.dumps(res, indent=1))
        return

    # ---- one guided UNet step at 64x64 latents + VAE decode
    with torch.no_grad():
        cond = a.encode_prompts(a.tokenize(["a photo of a person"]))
        uncond = a.encode_prompts(a.tokenize([""]))
        x = torch.randn(1, 4, 64, 64)
        t = torch.full((2,), 500, dtype=torch.long)
        a.noise_pred(torch.cat([x, x]), t, torch.cat([uncond, cond]))  # warm-up
        t0 = time.perf_counter()
        a.noise_pred(torch.cat([x, x]), t, torch.cat([uncond, cond]))
        res["unet_cfg_step_64x64_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        img = a.decode_latents(x)
        res["vae_decode_512_s"] = round(time.perf_counter() - t0, 2)
        assert img.shape == (1, 3, 512, 512)
    res["sample_512_50_steps_extrapolated_s"] = round(50 * res["unet_cfg_step_64x64_s"] + res["vae_decode_512_s"], 1)
    res["peak_gib_after_sampling"] = round(peak_gib(), 2)

    # ---- one ESD-x step (x_t given)
    ref = a.reference()
    names = set(a.parameter_groups()["cross_attention"])
    for n, p in a.model.named_parameters():
        p.requires_grad_(n in names)
    params = [p for n, p in a.model.named_parameters() if n in names]
    opt = torch.optim.AdamW(params, lr=1e-5)
    a.unet.train()
    x_t, t1 = torch.randn(1, 4, 64, 64), torch.full((1,), 500, dtype=torch.long)
    steps = []
    for _ in range(2):  # the first step allocates the optimiser state
        t0 = time.perf_counter()
        loss = esd_loss(a, ref, x_t, t1, cond, uncond, 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps.append(time.perf_counter() - t0)
    res["esd_x_step_s"] = [round(s, 2) for s in steps]
    res["esd_x_trainable_M"] = round(sum(p.numel() for p in params) / 1e6, 1)
    res["peak_gib_after_esd"] = round(peak_gib(), 2)
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
