"""GGUF: ggml block codecs (blocks: layouts and decoding, encode: encoders), the file reader,
the llama name and layout mapping, and the file writer. Import the submodules directly.
"""
