from llmft.cli import main

main()
