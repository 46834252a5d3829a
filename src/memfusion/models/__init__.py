"""The reference model: a small Hugging Face causal LM trained by the project on its synthetic tasks.

``memfusion.models.tokenizer`` builds its tokenizer (a fixed word-level vocabulary, digits one per
token) and defines the fact-lookup format the engine uses to put retrieved facts in context.
Nothing is imported here: the submodules load ``tokenizers`` / ``transformers`` only when called.
"""
