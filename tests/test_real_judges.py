"""Real judges (unlearn.evaluators.real_judges) on tiny random weights saved to disk: a tiny
CLIPModel directory (CLIP zero-shot, CLIP score, Q16), a tiny ONNX detector with NudeNet's
output layout, and the FID Inception-v3 with random weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from unlearn.evaluators import real_judges as rj

LABEL_WORDS = ["church", "parachute", "truck", "red", "green", "blue", "yellow", "circle", "square", "triangle",
               "cross", "solid", "striped", "dotted"]


def make_tiny_clip(d):
    """A tiny CLIPModel (16-dim towers, 8-dim projection, 32 x 32 images) + tokenizer + image
    processor saved to ``d`` (a word-level tokenizer over LABEL_WORDS and the templates)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from unlearn.zoo.image_models import build_caption_tokenizer

    tok = build_caption_tokenizer([f"a photo of a {w}" for w in LABEL_WORDS] + ["a painting in the style of"],
                                  max_length=16)
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=16, pad_token_id=tok.pad_token_id,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        image_size=32, patch_size=8),
                     projection_dim=8)
    CLIPModel(cfg).save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(5, 20, 28, 3), dtype=np.uint8)


def _hand_clip(clip_dir, images, texts):
    """Image/text embeddings through CLIPModel's own forward (logits_per_image = scale · cos)."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).eval()
    tok = AutoTokenizer.from_pretrained(clip_dir)
    proc = CLIPImageProcessor.from_pretrained(clip_dir)
    enc = tok(list(texts), padding="max_length", max_length=16, return_tensors="pt")
    px = proc(images=list(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=px)
    cos = (out.logits_per_image / model.logit_scale.exp()).detach().numpy()
    return cos, torch.nn.functional.normalize(out.image_embeds, dim=-1).numpy()


# ------------------------------------------------------------------------------ recipe syntax
def test_parse_judge_spec_options_and_errors():
    assert rj.parse_judge_spec("clip:/m/clip?object=church,parachute&template=a%20photo%20of%20{}") == (
        "clip", "/m/clip", {"object": "church,parachute", "template": "a photo of {}"})
    assert rj.parse_judge_spec("nudenet:/m/320n.onnx") == ("nudenet", "/m/320n.onnx", {})
    for bad, needle in (("clip:/m?object", "not key=value"), ("clip:/m?a=x,y&a=z,w", "given twice"),
                        ("clip:?object=a,b", "no path"), ("yolo:/m", "NAME one of")):
        with pytest.raises(ValueError, match=needle):
            rj.parse_judge_spec(bad)


def test_load_judge_routes_real_judges_and_keeps_user_factories(clip_dir):
    from unlearn.tasks.visual import load_judge

    j = load_judge(f"clip:{clip_dir}?colour=red,green,blue")
    assert isinstance(j, rj.ClipZeroShotJudge) and j.attributes == {"colour": ["red", "green", "blue"]}
    with pytest.raises(ValueError, match="unknown option"):
        load_judge(f"q16:{clip_dir}?prompts=x&thresh=1")
    with pytest.raises(ValueError, match="cannot import"):   # module:factory still goes to the import path
        load_judge("unlearn.evaluators.real_judges:no_such_factory")


# ------------------------------------------------------------------------------ CLIP zero-shot + score
def test_clip_zero_shot_equals_clip_forward(clip_dir, images):
    labels = ["church", "parachute", "truck"]
    judge = rj.load_real_judge(f"clip:{clip_dir}?object={','.join(labels)}")
    cos, img_emb = _hand_clip(clip_dir, images, [f"a photo of a {w}" for w in labels])
    np.testing.assert_allclose(judge.scores(images)["object"], cos, atol=1e-5)
    assert judge.predict(images)["object"] == [labels[i] for i in cos.argmax(1)]
    np.testing.assert_allclose(judge.features(images), img_emb, atol=1e-5)
    # a second attribute with its own template: its scores are the template's prompts
    j2 = rj.load_real_judge(f"clip:{clip_dir}?style=red,blue&template=a painting in the style of {{}}")
    cos2, _ = _hand_clip(clip_dir, images, ["a painting in the style of red", "a painting in the style of blue"])
    np.testing.assert_allclose(j2.scores(images)["style"], cos2, atol=1e-5)
    assert j2.fingerprint() != judge.fingerprint()
    with pytest.raises(ValueError, match="at least two"):
        rj.load_real_judge(f"clip:{clip_dir}?object=church")
    with pytest.raises(ValueError, match="no labels"):
        rj.load_real_judge(f"clip:{clip_dir}")


def test_clip_score_is_100_max_cos_0(clip_dir, images):
    prompts = ["a photo of a church", "a photo of a truck", "a photo of a red", "a photo of a circle",
               "a photo of a dotted"]
    enc = rj.ClipEncoder(clip_dir, "test")
    cos, _ = _hand_clip(clip_dir, images, prompts)
    hand = 100 * np.maximum(np.diag(cos), 0)
    np.testing.assert_allclose(rj.clip_score(enc, images, prompts), hand, atol=1e-3)
    enc.model.text_projection.weight.data.neg_()       # every cosine flips sign: the positive ones now score 0
    flipped = rj.clip_score(enc, images, prompts)
    np.testing.assert_allclose(flipped, 100 * np.maximum(-np.diag(cos), 0), atol=1e-3)
    assert (flipped[np.diag(cos) > 0] == 0).all()
    with pytest.raises(ValueError, match="one prompt per image"):
        rj.clip_score(enc, images, prompts[:2])


@pytest.mark.parametrize("remove, needle", [
    (None, "does not exist"), ("model.safetensors", "model.safetensors is missing"),
    ("preprocessor_config.json", "preprocessor_config.json is missing"), ("tokenizer.json", "tokenizer.json"),
])
def test_clip_dir_missing_files_one_line(clip_dir, tmp_path, remove, needle):
    import shutil

    d = tmp_path / "clip"
    if remove is not None:
        shutil.copytree(clip_dir, d)
        (d / remove).unlink()
        if remove == "model.safetensors":
            (d / "pytorch_model.bin").write_bytes(b"pickle")   # a pickle is named, never opened
    with pytest.raises(ValueError, match=needle) as e:
        rj.load_real_judge(f"clip:{d}?object=church,truck")
    assert "\n" not in str(e.value) and str(d) in str(e.value)
    if remove == "model.safetensors":
        assert "pytorch_model.bin is a pickle" in str(e.value)


# ------------------------------------------------------------------------------ Q16
def test_q16_reads_its_prompt_embeddings(clip_dir, images, tmp_path):
    from safetensors.torch import save_file

    enc = rj.ClipEncoder(clip_dir, "test")
    e0 = torch.from_numpy(enc.image_embeds(images[:1]))[0]
    save_file({"prompts": torch.stack([-e0, e0])}, str(tmp_path / "flag.safetensors"))     # row 1 = inappropriate
    save_file({"prompts": torch.stack([e0, -e0])}, str(tmp_path / "pass.safetensors"))
    flag = rj.load_real_judge(f"q16:{clip_dir}?prompts={tmp_path / 'flag.safetensors'}")
    ok = rj.load_real_judge(f"q16:{clip_dir}?prompts={tmp_path / 'pass.safetensors'}")
    assert flag.predict(images[:1]) == {"q16": ["inappropriate"]}
    assert ok.predict(images[:1]) == {"q16": ["safe"]}
    # probability = softmax(100 · x̂ · p̂ᵀ)[1], by hand
    x = enc.image_embeds(images).astype(np.float64)
    logits = 100 * np.stack([-(x @ e0.numpy()), x @ e0.numpy()], 1)
    hand = np.exp(logits[:, 1] - logits.max(1)) / np.exp(logits - logits.max(1, keepdims=True)).sum(1)
    np.testing.assert_allclose(flag.probabilities(images), hand, atol=1e-6)
    assert flag.features(images).shape == (5, 8)
    save_file({"prompts": torch.zeros(2, 5)}, str(tmp_path / "dim.safetensors"))
    with pytest.raises(ValueError, match="projection dim is 8"):
        rj.load_real_judge(f"q16:{clip_dir}?prompts={tmp_path / 'dim.safetensors'}")
    with pytest.raises(ValueError, match="q16_prompts.safetensors is missing") as e:
        rj.load_real_judge(f"q16:{clip_dir}")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------ NudeNet
class _ToyDetector(torch.nn.Module):
    """NudeNet's output layout (1, 4 + 18, anchors) on a 64 x 64 input: anchor 0 is a box in the
    top-left quadrant scored FEMALE_BREAST_EXPOSED = mean red there; anchor 1 the same box scored
    FACE_FEMALE = mean green (overlaps anchor 0, so NMS keeps the higher); anchor 2 a box in the
    bottom-right quadrant scored MALE_GENITALIA_EXPOSED = mean blue; anchor 3 always 0.1."""

    def forward(self, x):                                      # x: (1, 3, 64, 64) in [0, 1]
        q = x[:, :, :32, :32].mean((2, 3))                     # (1, 3)
        br = x[:, :, 32:, 32:].mean((2, 3))
        z = torch.zeros(1, 18, 4) + 0.0 * x.mean()
        idx = rj.NUDENET_LABELS.index
        z[0, idx("FEMALE_BREAST_EXPOSED"), 0] = q[0, 0]
        z[0, idx("FACE_FEMALE"), 1] = q[0, 1]
        z[0, idx("MALE_GENITALIA_EXPOSED"), 2] = br[0, 2]
        z[0, idx("FEET_COVERED"), 3] = 0.1
        boxes = torch.tensor([[16.0, 17.0, 48.0, 8.0], [16.0, 16.0, 30.0, 30.0], [48.0, 48.0, 20.0, 20.0],
                              [32.0, 32.0, 10.0, 10.0]]).T[None]   # (1, 4, 4): cx, cy, w, h per anchor
        return torch.cat([boxes, z], 1)                        # (1, 22, 4)


@pytest.fixture(scope="module")
def toy_onnx(tmp_path_factory):
    p = tmp_path_factory.mktemp("nudenet") / "toy.onnx"
    torch.onnx.export(_ToyDetector(), torch.zeros(1, 3, 64, 64), str(p), dynamo=False, input_names=["images"],
                      output_names=["output0"])
    return p


def _quadrants(tl, br):
    img = np.zeros((48, 48, 3), np.uint8)
    img[:24, :24], img[24:, 24:] = tl, br
    return img


def test_nudenet_judge_threshold_classes_and_features(toy_onnx):
    red, weak_red, green, blue = (_quadrants((255, 0, 0), 0), _quadrants((140, 0, 0), 0), _quadrants((0, 255, 0), 0),
                                  _quadrants(0, (0, 0, 255)))
    batch = np.stack([red, weak_red, green, blue])
    judge = rj.load_real_judge(f"nudenet:{toy_onnx}")
    assert judge.size == 64 and judge.threshold == 0.6
    assert judge.predict(batch) == {"nudity": ["nude", "safe", "safe", "nude"]}   # 140/255 = 0.55 < 0.6
    assert rj.load_real_judge(f"nudenet:{toy_onnx}?threshold=0.5").predict(batch)["nudity"][1] == "nude"
    assert rj.load_real_judge(f"nudenet:{toy_onnx}?classes=FACE_FEMALE").predict(batch)["nudity"] == [
        "safe", "safe", "nude", "safe"]
    f = judge.features(batch)
    assert f.shape == (4, 18)
    assert f[0, rj.NUDENET_LABELS.index("FEMALE_BREAST_EXPOSED")] > 0.95   # mean red of the resized quadrant
    assert f[3, rj.NUDENET_LABELS.index("MALE_GENITALIA_EXPOSED")] > 0.95
    # boxes map back to the 48 x 48 image (input 64: factor 3/4), clipped to it
    det = [d for d in judge.detect(red[None])[0] if d["class"] == "FEMALE_BREAST_EXPOSED"][0]
    assert det["box"] == pytest.approx([0.0, (17 - 4) * 0.75, (16 + 24) * 0.75, (17 + 4) * 0.75], abs=0.1)
    assert rj.load_real_judge(f"nudenet:{toy_onnx}?label=nudity").predict(batch)["nudity"] == [
        "nudity", "safe", "safe", "nudity"]
    with pytest.raises(ValueError, match="unknown NudeNet label"):
        rj.load_real_judge(f"nudenet:{toy_onnx}?classes=NAKED")


def test_nudenet_preprocess_pads_bottom_right_with_black():
    img = np.full((20, 40, 3), 200, np.uint8)
    img[..., 2] = 50                                 # RGB order is kept: channel 2 stays 50
    blob, factor = rj.nudenet_preprocess(img, 80)
    assert blob.shape == (1, 3, 80, 80) and blob.dtype == np.float32 and factor == 0.5
    assert np.allclose(blob[0, 0, :38], 200 / 255) and np.allclose(blob[0, 2, :38], 50 / 255)
    assert np.allclose(blob[0, :, 42:], 0.0)         # the padded bottom half is black


def test_nudenet_postprocess_filters_and_suppresses_like_nudenet():
    def anchor(cx, cy, w, h, cls, score):
        col = np.zeros(22)
        col[:4], col[4 + rj.NUDENET_LABELS.index(cls)] = (cx, cy, w, h), score
        return col

    cols = [anchor(10, 10, 10, 10, "FACE_MALE", 0.9),
            anchor(11, 10, 10, 10, "BUTTOCKS_EXPOSED", 0.8),     # IoU 0.82 with the face: suppressed (class-agnostic)
            anchor(50, 50, 10, 10, "ANUS_EXPOSED", 0.7),
            anchor(80, 80, 10, 10, "BELLY_EXPOSED", 0.22),       # >= 0.2 but < 0.25: dropped at NMS
            anchor(90, 90, 10, 10, "FEET_EXPOSED", 0.1)]         # < 0.2
    dets = rj.nudenet_postprocess(np.stack(cols, 1)[None], factor=2.0, width=100, height=300)
    assert [(d["class"], round(d["score"], 2)) for d in dets] == [("FACE_MALE", 0.9), ("ANUS_EXPOSED", 0.7)]
    assert dets[1]["box"] == [90.0, 90.0, 100.0, 110.0]      # (45..55) x 2, x2 clipped to the width 100
    with pytest.raises(ValueError, match="NudeNet v3"):
        rj.nudenet_postprocess(np.zeros((1, 10, 3)))


def test_nudenet_missing_file_and_runtime_errors(tmp_path, monkeypatch, toy_onnx):
    import sys

    with pytest.raises(ValueError, match="320n.onnx ships inside the nudenet wheel") as e:
        rj.load_real_judge(f"nudenet:{tmp_path / 'detector.onnx'}")
    assert "\n" not in str(e.value) and "detector.onnx" in str(e.value)
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        rj.load_real_judge(f"nudenet:{tmp_path / 'junk.onnx'}")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ValueError, match="pip install onnxruntime"):
        rj.load_real_judge(f"nudenet:{toy_onnx}")


# ------------------------------------------------------------------------------ FID Inception
@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory):
    """Random FID-Inception weights in pytorch-fid's layout (with the 1008-way fc, without
    num_batches_tracked) as .pth and as .safetensors."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("fid")
    torch.manual_seed(0)
    net = rj.FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):       # He init: the random network's output still depends on its input
            torch.nn.init.normal_(m.weight, std=(2 / m.weight[0].numel()) ** 0.5)
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial BN statistics, so loading them matters
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    torch.save(sd, d / "pt_inception.pth")
    save_file(sd, str(d / "pt_inception.safetensors"))
    return d


def test_fid_inception_loads_pth_and_safetensors_and_measures_distance(fid_weights, clip_dir):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, size=(2, 24, 24, 3), dtype=np.uint8)
    b = (a // 4).astype(np.uint8)                                   # darker copies: different statistics
    fa = rj.FIDFeatures(fid_weights / "pt_inception.pth")
    fb = rj.FIDFeatures(fid_weights / "pt_inception.safetensors")
    for k, v in fa.net.state_dict().items():
        assert torch.equal(v, fb.net.state_dict()[k]), k
    feats = fa(np.concatenate([a, b]))
    assert feats.shape == (4, 2048) and np.abs(feats[:2] - feats[2:]).max() > 1e-4
    # fid= on a judge swaps its features for the Inception's
    j = rj.load_real_judge(f"clip:{clip_dir}?object=church,truck&fid={fid_weights / 'pt_inception.safetensors'}")
    np.testing.assert_allclose(j.features(a), feats[:2], rtol=1e-5, atol=1e-6)


def test_fid_weights_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(ValueError, match="pt_inception-2015-12-05-6726825d.pth") as e:
        rj.load_fid_inception(tmp_path / "missing.pth")
    assert "\n" not in str(e.value)
    save_file({"conv.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not the FID Inception state dict"):
        rj.load_fid_inception(tmp_path / "other.safetensors")
    (tmp_path / "w.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match="must be .safetensors or a .pth"):
        rj.load_fid_inception(tmp_path / "w.ckpt")


# ------------------------------------------------------------------------------ through a run
def test_clip_judge_in_a_visual_run(clip_dir, tmp_path):
    """The CLIP judge in eval.judge of a visual recipe: the i2p suite reads its predictions and
    features, provenance records its fingerprint."""
    import unlearn

    spec = f"clip:{clip_dir}?colour=red,green,blue,yellow&shape=circle,square,triangle,cross"
    r = {"name": "vis", "model": {"source": "zoo:tiny-t2i/target"}, "task": {"name": "visual"},
         "method": {"name": "uce"}, "eval": {"judge": spec, "max_items": 2, "sample_steps": 2},
         "output": {"dir": str(tmp_path / "run")}}
    res = unlearn.run(r, progress=False)
    m = json.loads((res.run_dir / "metrics.json").read_text())
    assert m["provenance"]["judge"]["fingerprint"] == rj.load_real_judge(spec).fingerprint()
    s = m["summary"]["unlearned"]
    assert s["erasure_explicit"] is not None and s["retain_in_domain"] is not None and s["fid_like"] is not None
    assert s["retain_cross_domain"] is not None   # shape is read; texture is not


@pytest.mark.slow
def test_frechet_inception_distance_zero_for_same_set(fid_weights):
    """FID of a set with itself is 0 and with darker copies > 0 (two 2048-dim eigendecompositions each:
    about 10 s on one thread)."""
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, size=(3, 24, 24, 3), dtype=np.uint8)
    feats = rj.FIDFeatures(fid_weights / "pt_inception.safetensors")
    assert rj.frechet_inception_distance(a, a, feats) == pytest.approx(0.0, abs=1e-6)
    assert rj.frechet_inception_distance(a, a // 4, feats) > 1e-3
