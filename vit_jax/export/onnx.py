"""ONNX export: our weights in the Hugging Face PyTorch ViT, exported by `torch.onnx` (dynamo).

Input `pixel_values` float32 [batch, 3, H, W] in [-1, 1] (the Hugging Face convention), output
`logits` [batch, num_classes]; the batch dimension is dynamic. A representation layer
(`pre_logits`) is kept: the graph is HF's `ViTModel` pooler (dense + tanh on the class token)
followed by our head. Plain ViT only (the same limits as the Hugging Face export): hybrids and
Mixer have no PyTorch model here, and jax2onnx, which would convert them from the jaxpr, pins an
older orbax-checkpoint than ours (see docs/export.md).
"""

from __future__ import annotations

import os

import numpy as np

from vit_jax.export import hf

RUNTIME = 'onnxruntime (CPU)'


def check(loaded) -> None:
  """Raises ValueError for a checkpoint the onnx path cannot hold (checked before any torch)."""
  try:
    hf.check_plain_vit(loaded.model_config)
  except ValueError as e:
    raise ValueError(f'ONNX export goes through the Hugging Face PyTorch ViT: {e}') from None


def _torch_model(loaded):
  """A torch module: pixel_values -> logits (HF classifier, or HF pooler + our head)."""
  import torch

  class Logits(torch.nn.Module):
    def __init__(self, model, head):
      super().__init__()
      self.model, self.head = model, head

    def forward(self, pixel_values):
      out = self.model(pixel_values=pixel_values)
      return out.logits if self.head is None else self.head(out.pooler_output)

  model = hf.to_hf_model(loaded.params, loaded.model_config, image_size=loaded.image_size)
  head = None
  if 'pre_logits' in loaded.params:
    kernel, bias = loaded.params['head']['kernel'], loaded.params['head']['bias']
    head = torch.nn.Linear(*kernel.shape)
    with torch.no_grad():
      head.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.T)))
      head.bias.copy_(torch.from_numpy(np.asarray(bias)))
  return Logits(model, head).eval()


def save(loaded, out_dir: str) -> str:
  """Writes `out_dir/model.onnx`; returns its path.

  Raises:
    ValueError: hybrids, Mixer and non-token classifiers (no PyTorch ViT to export them from).
  """
  import torch

  check(loaded)
  model = _torch_model(loaded)
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, 'model.onnx')
  example = torch.zeros(2, 3, loaded.image_size, loaded.image_size)
  program = torch.onnx.export(
    model,
    (example,),
    input_names=['pixel_values'],
    output_names=['logits'],
    dynamic_shapes=({0: torch.export.Dim('batch')},),
    dynamo=True,
    external_data=False,
    verbose=False,
  )
  program.save(path)
  return path


def run(path: str, images: np.ndarray, labels=None) -> np.ndarray:
  """Logits from onnxruntime (CPU) for NHWC images in [-1, 1]."""
  del labels
  import onnxruntime

  session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
  pixels = np.ascontiguousarray(images.transpose(0, 3, 1, 2), np.float32)
  return session.run(['logits'], {'pixel_values': pixels})[0]
