"""storyc: compile one story.yaml into a reproducible Kolors LoRA storytelling pipeline.

Kept free of heavy imports: ``import storyc`` must stay fast (tests/test_cli.py::test_light_commands_import_no_heavy_library).
"""
__version__ = "0.1.0"
