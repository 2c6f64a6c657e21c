"""Training: configuration (:mod:`.config`), data (:mod:`.data`), a new model (:mod:`.model`,
:mod:`.tokenizer`), the loop (:mod:`.loop`), Ray Train (:mod:`.distributed`) and the command (:mod:`.cli`)."""
