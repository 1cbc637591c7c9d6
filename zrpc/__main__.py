from zrpc._tools._cli import main

main()
