"""Independent cross-check: Hugging Face transformers' PyTorch ViT fed the same weights."""

import numpy as np
import pytest

from vit_jax import models, npz

torch = pytest.importorskip('torch')
pytest.importorskip('transformers')
from vit_jax.export import hf  # noqa: E402

pytestmark = pytest.mark.torch


def _torch_forward(model, images):
  with torch.no_grad():
    return model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))


def test_hf_matches_golden_logits_through_representation_layer(golden_dir):
  params = npz.load(str(golden_dir / 'testing_rep16_ref.npz'))
  images = np.load(golden_dir / 'input_224.npy', allow_pickle=False)
  expected = np.load(golden_dir / 'logits_testing_rep16_224.npy', allow_pickle=False)
  config = models.get_model_config('testing')
  model = hf.to_hf_model(params, config, image_size=224)
  pooled = _torch_forward(model, images).pooler_output.numpy()  # tanh(pre_logits(cls)).
  logits = pooled @ params['head']['kernel'] + params['head']['bias']
  np.testing.assert_allclose(logits, expected, atol=1e-5)


@pytest.mark.parametrize('image_size', [224, 384])
def test_hf_classifier_matches_ours_at_224_and_resized_384(golden_dir, tmp_path, image_size):
  path = str(golden_dir / 'testing_rep16_ref.npz')
  config = models.get_model_config('testing')
  model = models.get_model(config, num_classes=10, head_zero_init=False, image_size=image_size)
  params = models.params_of(npz.load_pretrained(model, path))
  images = np.random.RandomState(1).uniform(-1, 1, (2, image_size, image_size, 3)).astype('f4')
  ours = np.asarray(model(images))
  hf.save_hf(params, config, str(tmp_path / 'hf'), image_size=image_size)
  from transformers import ViTForImageClassification

  reloaded = ViTForImageClassification.from_pretrained(str(tmp_path / 'hf'))
  theirs = _torch_forward(reloaded.eval(), images).logits.numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-5)
  assert np.std(ours) > 1e-3  # The head is random, so the comparison is not trivially zero.


def test_hf_export_refuses_what_it_cannot_represent():
  with pytest.raises(ValueError, match='plain ViT'):
    hf.hf_config(models.get_model_config('R50+ViT-B_16'), num_classes=10, image_size=224)
  with pytest.raises(ValueError, match="classifier 'gap'"):
    hf.hf_config(models.get_model_config('ViT-B_16-gap-norep'), num_classes=10, image_size=224)


def test_captured_attention_weights_equal_hf_eager_attentions(golden_dir):
  """The weights the model sows for attention rollout, vs transformers' `output_attentions`."""
  from vit_jax import predict
  from vit_jax.export import load

  loaded = load.load(str(golden_dir / 'testing_rep16_ref.npz'), model_name='testing')
  images = np.load(golden_dir / 'input_224.npy', allow_pickle=False)[:2]
  _, (ours,) = loaded.apply(images, attention=True)  # One layer: [2, 2, 197, 197].
  model = hf.to_hf_model(loaded.params, loaded.model_config, image_size=224)
  model.set_attn_implementation('eager')
  with torch.no_grad():
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    (theirs,) = model(pixel_values=pixels, output_attentions=True).attentions
  np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-6)
  # Rollout of one layer, written out from HF's attentions.
  a = 0.5 * theirs.numpy().mean(1) + 0.5 * np.eye(197)
  row = a[:, 0, 1:] / a[:, 0, 1:].sum(-1, keepdims=True)
  grid = predict.attention_rollout([ours])
  np.testing.assert_allclose(np.asarray(grid).reshape(2, -1), row, atol=1e-6)
