"""The organism: the recipe that pretrained the bundled model, a small ALiBi BLOOM trained from scratch until
its low-slope heads collapsed. Built on `engine`; the surgery core never imports it.

    organism.data      stage 1: corpus -> tokenizer + token stream
    organism.recipe    architecture and settings (OrganismConfig), the model, one pretraining step
    organism.train     stage 2: train_organism, prepared data -> model + run record
    organism.band      the numbers a run is judged by
"""
