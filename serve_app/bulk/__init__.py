"""Bulk generation on Ray Data: a file of requests in, a directory of images and a manifest out.

    sd-serve bulk prompts.jsonl out/ --model synthetic:tiny      (or: python -m serve_app.bulk ...)

No HTTP server: Ray Data reads the input (`source`), checks every row with the HTTP
API's own request models and limits (`rows`), hands rows sorted by their compatibility
key to a pool of actors that each hold one engine and write their images (`worker`),
and writes the manifest Ray Data collects (`manifest`); `runner` puts these together.

An edge module like the ingress and the generator: it imports Ray and the pipeline
layer; the pipeline layer never imports it. Importing this package (and `command`,
which the `sd-serve` CLI loads) stays free of Ray and torch.
"""
