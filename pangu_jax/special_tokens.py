"""The special token ids of PanGu's vocabulary (PANGU.md, "Tokenizer"), defined once."""

UNK_ID = 0
SEP_ID = 5  # between a prompt and its response
PAD_ID = 6
EOD_ID = 8  # end of document
EOT_ID = 9  # end of text: generation stops here, and fine-tuning ends each document with it
