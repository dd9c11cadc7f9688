"""Rendering with per-row concept sets through the stock diffusers pipeline."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import perfusion
from perfusion.errors import RenderError

SETTINGS = perfusion.RenderSettings(steps=8, batch_size=8)
MIXED_TOLERANCE = 1e-5  # max abs pixel difference ([0, 1] scale) between a mixed batch and rows alone


@pytest.fixture
def renderer(base, covariance, trained_pair) -> perfusion.ConceptRenderer:
    renderer = perfusion.ConceptRenderer(base, covariance)
    for concept in trained_pair:
        renderer.attach(concept)
    return renderer


MIXED = [
    perfusion.RenderRequest("a photo of <mug-1>", seed=1),
    perfusion.RenderRequest("a photo of a dog on the beach", seed=2),
    perfusion.RenderRequest("<mug-1> next to <bag-1> on a wooden table", seed=3, gates={"<bag-1>": (0.6, 0.15)}),
    perfusion.RenderRequest("a photo of <bag-1> in a kitchen", seed=4),
    perfusion.RenderRequest("a photo of <mug-1>", seed=5, gates={"<mug-1>": (0.5, 0.2)}),
]


@pytest.mark.parametrize("lock", ["local", "global"])
def test_a_mixed_batch_equals_rendering_each_row_alone(renderer, lock):
    settings = perfusion.RenderSettings(steps=8, batch_size=8, lock=lock)
    mixed = renderer.render_arrays(MIXED, settings)
    alone = np.concatenate([renderer.render_arrays([request], settings) for request in MIXED])
    assert mixed.shape == (5, 32, 32, 3)
    assert np.abs(mixed - alone).max() < MIXED_TOLERANCE


def test_a_prompt_without_concept_tokens_renders_like_the_base_model(renderer):
    plain = perfusion.load_base("tiny")  # stock processors, no concepts anywhere
    prompt = "a photo of a dog on the beach"
    expected = plain.pipeline(
        prompt=prompt,
        num_inference_steps=8,
        guidance_scale=SETTINGS.guidance_scale,
        generator=[torch.Generator().manual_seed(2)],
        output_type="np",
    ).images
    rendered = renderer.render_arrays(MIXED, SETTINGS)[1]  # in a batch with concept rows
    assert np.abs(rendered - expected[0]).max() < MIXED_TOLERANCE


def test_concepts_change_the_image_and_gates_control_the_strength(renderer):
    prompt = "a photo of <mug-1>"
    requests = [
        perfusion.RenderRequest(prompt, seed=1),
        perfusion.RenderRequest(prompt, seed=1, gates={"<mug-1>": (50.0, 0.15)}),  # gate shut
        perfusion.RenderRequest(prompt, seed=1),
        perfusion.RenderRequest("a photo of a mug", seed=1),
    ]
    default, shut, again, superclass = renderer.render_arrays(requests, SETTINGS)
    assert np.array_equal(default, again)
    assert np.abs(default - shut).max() > 1e-3
    assert np.abs(default - superclass).max() > 1e-3


def test_exact_and_approximate_projections_agree_for_one_concept(renderer):
    request = [perfusion.RenderRequest("a photo of <mug-1>", seed=1)]
    exact = renderer.render_arrays(request, SETTINGS)
    approx = renderer.render_arrays(request, perfusion.RenderSettings(steps=8, exact_projection=False))
    assert np.abs(exact - approx).max() < 1e-4


def test_explicit_concept_sets_and_pil_output(renderer):
    images = renderer.render([perfusion.RenderRequest("a photo of a cup", seed=0, concepts=("<mug-1>",))], SETTINGS)
    assert images[0].size == (32, 32) and images[0].mode == "RGB"


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (perfusion.RenderRequest("a photo of a mug", concepts=("<nope>",)), r"not attached"),
        (perfusion.RenderRequest("a photo of <mug-1>", gates={"<bag-1>": (0.5, 0.1)}), "does not use"),
    ],
)
def test_bad_requests_fail_before_rendering(renderer, request_, message):
    with pytest.raises(RenderError, match=message):
        renderer.render([MIXED[0], request_], SETTINGS)


def test_a_prompt_with_an_unattached_concept_token(renderer):
    renderer.detach("<bag-1>")
    with pytest.raises(RenderError, match=r"\['<bag-1>'\] that are not attached"):
        renderer.render([perfusion.RenderRequest("a photo of <bag-1>")], SETTINGS)


def test_long_prompts_are_truncated_with_a_warning(renderer, caplog):
    prompt = "a photo of <mug-1> " + " ".join(["on a marble counter"] * 30)
    with caplog.at_level(logging.WARNING, logger="perfusion.sampling"):
        images = renderer.render_arrays([perfusion.RenderRequest(prompt)], SETTINGS)
    assert images.shape == (1, 32, 32, 3)
    assert any("truncated" in record.getMessage() for record in caplog.records)


def test_settings_and_covariance_are_checked(base, covariance):
    with pytest.raises(RenderError, match="lock must be 'local' or 'global'"):
        perfusion.RenderSettings(lock="sideways")
    wrong = perfusion.Covariance.from_second_moment(covariance.second_moment, "0" * 32, 10)
    with pytest.raises(RenderError, match="covariance belongs to base model"):
        perfusion.ConceptRenderer(base, wrong)


@pytest.mark.parametrize(("dtype", "bound"), [(torch.float16, 0.02), (torch.bfloat16, 0.05)])
def test_half_precision_keeps_the_identity_and_the_picture(covariance, trained_pair, dtype, bound):
    """fp16/bf16 (the GPU dtypes) run the same code path on CPU: same fingerprint, close pixels."""
    requests = [MIXED[0], MIXED[2]]
    full = perfusion.ConceptRenderer(perfusion.load_base("tiny"), covariance)
    half = perfusion.ConceptRenderer(perfusion.load_base("tiny", dtype=dtype), covariance)
    assert half.base.fingerprint == full.base.fingerprint and half.base.dtype == dtype
    for renderer in (full, half):
        for concept in trained_pair:
            renderer.attach(concept)
    difference = np.abs(half.render_arrays(requests, SETTINGS) - full.render_arrays(requests, SETTINGS))
    assert difference.max() < bound


def test_token_gates_show_where_each_concept_acts(base, covariance, trained_pair):
    from perfusion.rank1 import gate
    from perfusion.training import initial_concept

    renderer = perfusion.ConceptRenderer(base, covariance)
    renderer.attach(trained_pair[0])
    # untrained, i* from the one template it is asked in: its token's encoding there IS i* (s = 1 exactly)
    fresh = initial_concept(base, "<new>", "mug", perfusion.TrainConfig(templates=("a photo of a {}",)))
    renderer.attach(fresh)
    rows = renderer.token_gates(perfusion.RenderRequest("a photo of a <new> next to <mug-1>"))
    words = [w for w, _ in rows]
    assert words[0] == "<|startoftext|>" and words[-1] == "<|endoftext|>" and "<new>" in words
    assert all(set(g) == {"<new>", "<mug-1>"} and all(0 <= v <= 1 for v in g.values()) for _, g in rows)
    at_new = dict(rows)["<new>"]["<new>"]
    assert at_new == pytest.approx(float(gate(torch.tensor(1.0), fresh.beta, fresh.tau)), abs=1e-4)
    assert dict(rows)["<|startoftext|>"]["<new>"] < 0.05  # BOS is no mug
    shut = renderer.token_gates(perfusion.RenderRequest("a photo of a <new>", gates={"<new>": (50.0, 0.15)}))
    assert max(g["<new>"] for _, g in shut) < 1e-6
    with pytest.raises(RenderError, match="does not use"):  # checked like a render request
        renderer.token_gates(perfusion.RenderRequest("a photo of a mug", gates={"<new>": (0.5, 0.15)}))


def test_attention_maps_are_recorded_from_the_same_passes_without_changing_the_images(renderer):
    """Per request and prompt position, where the cross-attention goes (conditional rows only, batches of 2
    so requests span batches); each image position's probabilities over the prompt sum to 1."""
    settings = perfusion.RenderSettings(steps=4, batch_size=2)
    maps = perfusion.CrossAttentionMaps(grid=8)
    recorded = renderer.render_arrays(MIXED, settings, attention_maps=maps)
    np.testing.assert_array_equal(recorded, renderer.render_arrays(MIXED, settings))
    tokenizer = renderer.base.tokenizer
    for index in range(len(MIXED)):
        attention = maps.of(index)
        assert attention.shape == (tokenizer.model_max_length, 8, 8)
        torch.testing.assert_close(attention.sum(0), torch.ones(8, 8), atol=1e-4, rtol=0)
    ids = tokenizer(MIXED[2].prompt).input_ids
    mug = ids.index(tokenizer.convert_tokens_to_ids("<mug-1>"))
    assert maps.of(2)[mug].mean() > 0  # the concept's token draws some of the attention
    with pytest.raises(KeyError, match="request 5"):
        maps.of(5)


def test_confined_edits_act_only_at_their_own_token(renderer, base):
    """edit_positions="token": a concept edits only the positions holding its own token; a row that uses a
    concept whose token is not in its prompt renders exactly as the base; mixed batches stay exact."""
    confined = perfusion.RenderSettings(steps=6, batch_size=8, edit_positions="token")
    plain = perfusion.ConceptRenderer(perfusion.load_base("tiny"), renderer.covariance)
    request = perfusion.RenderRequest("a photo of a dog on the beach", seed=3, concepts=("<mug-1>",))
    np.testing.assert_allclose(
        renderer.render_arrays([request], confined),
        plain.render_arrays([perfusion.RenderRequest(request.prompt, seed=3)], confined),
        atol=1e-6,
    )
    mixed = renderer.render_arrays(MIXED, confined)
    alone = np.concatenate([renderer.render_arrays([r], confined) for r in MIXED])
    assert np.abs(mixed - alone).max() < MIXED_TOLERANCE
    # the mask itself: <mug-1>'s slot is open at <mug-1> only, <bag-1>'s at <bag-1> only
    tokenizer = renderer.base.tokenizer
    ids = tokenizer([MIXED[2].prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    concepts = [renderer.concepts["<mug-1>"], renderer.concepts["<bag-1>"]]
    token_ids = {c.token: tokenizer.convert_tokens_to_ids(c.token) for c in concepts}
    call = perfusion.PerfusionCall.build([concepts], renderer.covariance, confine="token", prompt_ids=(ids, token_ids))
    assert call.position_mask is not None and call.position_mask.shape == (1, 77, 2)
    for slot, concept in enumerate(concepts):
        where = call.position_mask[0, :, slot].nonzero().flatten().tolist()
        assert where == (ids[0] == token_ids[concept.token]).nonzero().flatten().tolist() and len(where) == 1
    with pytest.raises(RenderError, match="edit_positions"):
        perfusion.RenderSettings(edit_positions="box")


def test_edits_kept_off_the_other_concepts_tokens_leave_single_concept_rows_as_the_paper(renderer):
    """edit_positions="not_other_tokens": a row with one concept renders exactly as edit_positions="all"; with
    two, each concept's slot is shut at the other's token and open everywhere else."""
    paper = perfusion.RenderSettings(steps=6, batch_size=8)
    kept_off = perfusion.RenderSettings(steps=6, batch_size=8, edit_positions="not_other_tokens")
    single = [MIXED[0], MIXED[3]]
    np.testing.assert_array_equal(renderer.render_arrays(single, kept_off), renderer.render_arrays(single, paper))
    tokenizer = renderer.base.tokenizer
    ids = tokenizer([MIXED[2].prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    concepts = [renderer.concepts["<mug-1>"], renderer.concepts["<bag-1>"]]
    token_ids = {c.token: tokenizer.convert_tokens_to_ids(c.token) for c in concepts}
    call = perfusion.PerfusionCall.build(
        [concepts], renderer.covariance, confine="not_other_tokens", prompt_ids=(ids, token_ids)
    )
    mask = call.position_mask[0]  # (77, 2)
    mug, bag = (int((ids[0] == token_ids[t]).nonzero()) for t in ("<mug-1>", "<bag-1>"))
    assert mask[bag, 0] == 0 and mask[mug, 1] == 0 and mask.sum() == 2 * 77 - 2


def test_regional_edits_leave_single_concept_rows_as_the_paper_and_mixed_batches_exact(renderer):
    """edit_positions="regions": a row with one concept renders as edit_positions="all" (its region weight is
    1 everywhere); a two-concept row is changed; a mixed batch of 0, 1 and 2 concepts equals each row alone."""
    paper = perfusion.RenderSettings(steps=6, batch_size=8)
    regions = perfusion.RenderSettings(steps=6, batch_size=8, edit_positions="regions")
    single = [MIXED[0], MIXED[1], MIXED[3]]
    expected = renderer.render_arrays(single, paper)
    np.testing.assert_allclose(renderer.render_arrays(single, regions), expected, atol=1e-6)
    mixed = renderer.render_arrays(MIXED, regions)
    alone = np.concatenate([renderer.render_arrays([r], regions) for r in MIXED])
    assert np.abs(mixed - alone).max() < MIXED_TOLERANCE
    pair_paper = renderer.render_arrays([MIXED[2]], paper)
    assert np.abs(mixed[2] - pair_paper[0]).max() > 1e-3


def test_region_masks_open_each_slot_everywhere_in_its_own_region_and_at_its_token_elsewhere(renderer):
    tokenizer = renderer.base.tokenizer
    ids = tokenizer([MIXED[2].prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    concepts = [renderer.concepts["<mug-1>"], renderer.concepts["<bag-1>"]]
    token_ids = {c.token: tokenizer.convert_tokens_to_ids(c.token) for c in concepts}
    call = perfusion.PerfusionCall.build(
        [concepts], renderer.covariance, confine="regions", prompt_ids=(ids, token_ids)
    )
    assert call.position_mask is None and call.region_masks is not None
    masks = call.region_masks[:, 0]  # (3, 77, 2)
    mug, bag = (int((ids[0] == token_ids[t]).nonzero()) for t in ("<mug-1>", "<bag-1>"))
    assert masks[0, :, 0].nonzero().flatten().tolist() == [mug] and masks[0, :, 1].nonzero().flatten().tolist() == [bag]
    # region of <mug-1>: mug's slot everywhere but <bag-1>'s token, bag's slot at its token only; and vice versa
    assert masks[1, :, 0].sum() == 76 and masks[1, bag, 0] == 0 and masks[1, :, 1].nonzero().flatten().tolist() == [bag]
    assert masks[2, :, 1].sum() == 76 and masks[2, mug, 1] == 0 and masks[2, :, 0].nonzero().flatten().tolist() == [mug]
