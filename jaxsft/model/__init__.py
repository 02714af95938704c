"""The decoder, its parameter-efficient variants, and Hugging Face checkpoints in and out.

Shape suffixes. Arrays in the model, the loss and the sampler carry their shape in their
name, `x_BxTxD`, one letter per axis, and a letter means the same thing everywhere:

    B  batch rows                           T  tokens of a row (the queries)
    S  key / cache slots a query can see    D  model width (d_model)
    V  vocabulary                           F  MLP hidden width (d_ff)
    N  query heads                          K  key/value heads
    G  query heads per key/value head       H  head dim
    A  rotary frequencies (H / 2)           L  layers
    R  LoRA rank                            I, O  a kernel's input / output features, flattened
    M  the batch's B*T tokens, flattened    C  chunks of M (the chunked loss)
    E  tokens in one loss chunk             P  prompt tokens (generation)
    U  tokens generated per row             1  a kept axis of size 1
    W  virtual tokens (prefix / prompt tuning)  Q  bottleneck adapter width
"""
