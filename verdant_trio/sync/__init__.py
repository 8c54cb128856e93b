"""What the protocol means, as pure code: messages and their validation, patches, authorization
keys, presence, tokens, one library's decisions, error and close codes. No I/O of its own;
imports nothing else of the package."""
