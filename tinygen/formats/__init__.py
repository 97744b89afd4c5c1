"""The world's model files: GGUF and Hugging Face in, Hugging Face and GGUF out, tokenizer
conversion and models' own Jinja chat templates. This package imports core/; core/ never imports
it. Importing it registers its readers with core (checkpoint.register_format, and the Jinja
template reader with template.register_jinja_reader), so that core/checkpoint.load_model reads
every kind of file; the tinygen package imports it first thing, so every entry point has them.
"""

from tinygen.core.checkpoint import register_format
from tinygen.core.template import register_jinja_reader
from tinygen.formats import gguf_model, hf
from tinygen.formats.jinja import from_jinja

register_format(gguf_model.FORMAT)
register_format(hf.FORMAT)
register_jinja_reader(from_jinja)
