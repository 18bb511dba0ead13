"""Text in context: token ids to text and back where a piece's meaning depends on what comes before it.

A SentencePiece tokenizer (Llama-2, Mistral, TinyLlama: `Metaspace`) keeps a word's leading space in
the word's piece ("▁great") and drops it when that piece opens a decoded string: the continuation
"▁great" decoded alone reads "great", and "...was" + "great" is scored as "...wasgreat". Encoding a
string alone adds a word boundary it may not have after its context. So every continuation is decoded
as the whole episode minus its prompt, and every text written after a context is encoded the same way.
The reward, the metrics, the target regularisation and the guide all read text through these two.
"""


def decode_in_context(tokenizer, context_ids, ids):
    """The text `ids` add after `context_ids`: the whole decoded, minus the context decoded. Where the two
    disagree (a piece that changes how the context's end decodes), the ids decoded alone."""
    context = tokenizer.decode(context_ids, skip_special_tokens=True)
    text = tokenizer.decode(list(context_ids) + list(ids), skip_special_tokens=True)
    return text[len(context) :] if text.startswith(context) else tokenizer.decode(ids, skip_special_tokens=True)


def decode_continuations(tokenizer, prompt_ids, responses):
    """Each row's continuation text, decoded in context: prompt_ids[i] (a list of ids) then responses[i] (lists, or a
    tensor: read from the device once, never a token at a time; padding and EOS are special tokens and vanish)."""
    rows = responses.tolist() if hasattr(responses, "tolist") else responses
    return [decode_in_context(tokenizer, list(p), list(r)) for p, r in zip(prompt_ids, rows)]


def encode_in_context(tokenizer, context, text):
    """Token ids for `text` written after the string `context`, encoded in context (a SentencePiece tokenizer
    opens a string encoded alone with a word boundary: "the" + "!" would read "the !"). A special token's text
    inside `text` ("</s>" written by a guide) stays text, never the special token. Where the text's first piece
    fuses with the context's last token ("a good mov" + "ie and"), no continuation of the context's ids is the
    tokenizer's own: then the text is encoded after a separator that fuses with nothing, and kept where it reads
    right after the context (no spurious space); the text alone is the last resort."""
    def encode(string):
        return tokenizer(string, add_special_tokens=False, split_special_tokens=True).input_ids

    context_ids = encode(context)
    ids = encode(context + text)
    if ids[: len(context_ids)] == context_ids:
        return ids[len(context_ids) :]
    for separator in ("\n", ".", "#"):
        separator_ids, ids = encode(separator), encode(separator + text)
        if ids[: len(separator_ids)] == separator_ids and decode_in_context(
                tokenizer, context_ids, ids[len(separator_ids) :]) == text:
            return ids[len(separator_ids) :]
    return encode(text)
