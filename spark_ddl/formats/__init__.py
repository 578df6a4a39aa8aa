"""Bytes on disk and on the wire: model weights and export programs, streamed safetensors,
training checkpoints, and model directories written all or nothing."""
