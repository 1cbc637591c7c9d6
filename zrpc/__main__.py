from zrpc._tools.cli import main

main()
