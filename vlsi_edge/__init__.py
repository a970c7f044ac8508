"""vlsi-edge: VLsI verbalizer distillation for small vision-language models, shipped to Jetson and phones.

`import vlsi_edge` is lean: no torch, no transformers, no backend library (a test proves it). Host modules
(`vlsi_edge.models`, `vlsi_edge.distill`, `vlsi_edge.export`) are imported where they are used.
"""
__version__ = "0.1.0"
