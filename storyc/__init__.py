"""storyc: compile one story.yaml into a reproducible Kolors LoRA storytelling pipeline.

Kept free of heavy imports: ``import storyc`` must stay fast (see tests/test_light.py).
"""
__version__ = "0.1.0"
