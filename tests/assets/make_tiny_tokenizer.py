"""Build the tiny byte-level BPE tokenizer committed in tests/assets/tiny-tokenizer.

Run once by hand (`python tests/assets/make_tiny_tokenizer.py`); tests only read the result.
The vocabulary is small (~1k) so tiny models stay tiny, and the special tokens of every
chat-template family we ship are single tokens, so template masks can be checked exactly.
"""
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

OUT = Path(__file__).parent / "tiny-tokenizer"
SPECIALS = [
    "<pad>", "<eos>", "<bos>", "<unk>",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>",
    "<start_of_turn>", "<end_of_turn>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<s>", "</s>", "[INST]", "[/INST]",
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris.",
    "Hello! I am an AI assistant. How can I help you today? Please answer briefly.",
    "Olá! Eu sou um assistente. Qual é a capital do Brasil? Brasília. Obrigado.",
    "你好!我是一个人工智能助手。中国的首都是哪里?北京。谢谢。",
    "Translate to English: bom dia. Good morning. Summarize the text. Write a poem.",
    "system user assistant instruction input output history messages role content",
    "1 2 3 4 5 6 7 8 9 10 + - * / = ( ) [ ] { } < > : ; , . ! ? ' \" \n\t",
]


def main() -> None:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=SPECIALS, min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", model_max_length=512,
    )
    fast.save_pretrained(OUT)
    print(f"saved {len(fast)} tokens to {OUT}")


if __name__ == "__main__":
    main()
